"""The real `lm_eval` CLI on a `moeut export-hf` directory, offline, with moeut's shipped task configs and
local data: the command docs/evaluation.md documents."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.eval.conftest import write_task_data
from tests.integrations.conftest import need_hf

GIT_NOISE = "not a git repository"


def _need_lm_eval_hf() -> None:
    """lm-eval and what its ``--model hf`` imports (the eval extra); skip without them locally, fail under CI."""
    need_hf()
    for mod in ("lm_eval", "accelerate"):
        try:
            importlib.import_module(mod)
        except ImportError:
            msg = f"{mod} is not installed: pip install -e '.[eval]'"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(msg + " (CI installs the dev extra, which includes it)")
            pytest.skip(msg)


def _lm_eval_command() -> list[str]:
    script = Path(sys.executable).with_name("lm_eval")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lm_eval"]


@pytest.mark.slow
def test_lm_eval_cli_evaluates_an_export_offline_on_local_data(export_dir, tmp_path):
    _need_lm_eval_hf()
    from moeut.eval.harness_data import TASKS_DIR

    data = write_task_data(tmp_path / "data", n=3)
    work = tmp_path / "work"  # not a git checkout, and git may not look above it
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MOEUT_DATA=str(data), OMP_NUM_THREADS="1",
               HF_HOME=str(tmp_path / "hf_home"), HF_MODULES_CACHE=str(tmp_path / "modules"),
               GIT_CEILING_DIRECTORIES=str(tmp_path))
    cmd = _lm_eval_command() + ["--model", "hf", "--model_args", f"pretrained={export_dir},trust_remote_code=True",
                                "--tasks", "piqa", "--include_path", str(TASKS_DIR), "--limit", "3",
                                "--batch_size", "8", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=600)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said[-4000:]
    assert GIT_NOISE not in said
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    res = json.loads(result_file.read_text())
    assert res["n-samples"]["piqa"]["effective"] == 3
    assert res["results"]["piqa"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert str(TASKS_DIR / "piqa.yaml") in said  # moeut's local task, not lm-eval's Hub one
