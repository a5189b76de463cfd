"""`moeut export-hf` says which checkpoint it exports, and the Python it prints loads the export when pasted."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moeut.run.checkpoint import CorruptCheckpointError, checkpoint_path
from tests.integrations.conftest import need_hf
from tests.integrations.helpers import STEP, make_run

HINT_HEADER = "load it with transformers"


def _export(argv: list[str]) -> int:
    from moeut.cli.export_hf import add_arguments, run

    p = argparse.ArgumentParser()
    add_arguments(p)
    return run(p.parse_args(argv))


def _hint(stdout: str) -> str:
    """The Python lines printed after the hint's header, as a user would select and paste them."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(HINT_HEADER)) + 1
    return "\n".join(lines[start:])


def test_the_printed_hint_loads_model_and_tokenizer_without_a_prompt_or_warning(run_dir, tmp_path, capsys):
    need_hf()
    out = tmp_path / "export"
    assert _export(["--checkpoint", str(run_dir), "--out", str(out), "--no-verify"]) == 0
    stdout = capsys.readouterr().out
    assert f"exporting checkpoint {checkpoint_path(run_dir, STEP)} (step {STEP})" in stdout
    hint = _hint(stdout)
    assert "AutoTokenizer.from_pretrained" in hint and "AutoModelForCausalLM.from_pretrained" in hint

    script = hint + "\nprint('LOADED', type(model).__name__, tokenizer('the cat')['input_ids'])\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"),
               HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said[-3000:]
    assert "LOADED MoEUTForCausalLM" in proc.stdout
    assert "Do you wish to run the custom code" not in said  # transformers' interactive trust_remote_code question
    assert "model of type" not in said  # its warning after reading config.json without the remote code


def test_export_names_the_older_checkpoint_it_falls_back_to(tokenizer, tmp_path, capsys):
    need_hf()
    run = make_run(tmp_path / "run", tokenizer)
    bad = checkpoint_path(run, STEP + 1)
    bad.write_bytes(b"PK\x03\x04 not a whole zip")
    assert _export(["--checkpoint", str(run), "--out", str(tmp_path / "export"), "--no-verify"]) == 0
    cap = capsys.readouterr()
    assert f"exporting checkpoint {checkpoint_path(run, STEP)} (step {STEP})" in cap.out
    assert f"not the newest checkpoint of the run: checkpoint {bad} is corrupt" in cap.out
    assert str(bad) in cap.err  # the loader's warning
    with pytest.raises(CorruptCheckpointError) as err:
        _export(["--checkpoint", str(bad), "--out", str(tmp_path / "export2")])
    assert "to export another checkpoint" in str(err.value) and "resume" not in str(err.value)
    assert not Path(tmp_path / "export2").exists()
