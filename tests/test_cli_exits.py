"""Every verb ends without a traceback when the user interrupts it or its reader goes away."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moeut import cli

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}


def test_ctrl_c_in_any_verb_exits_130_without_a_traceback(monkeypatch, capsys):
    def interrupted(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.info, "run", interrupted)
    assert cli.main(["info"]) == 130
    assert capsys.readouterr().err.strip() == "moeut info: interrupted"


def _with_closed_stdout(*argv: str) -> subprocess.CompletedProcess:
    """Run ``moeut argv`` whose reader has gone before it writes (as ``moeut … | head`` after head exits)."""
    proc = subprocess.Popen([sys.executable, "-m", "moeut.cli", *argv], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)


def test_info_into_a_closed_pipe_is_quiet():
    res = _with_closed_stdout("info")
    assert res.returncode == 141, res.stderr
    assert res.stderr == ""


def test_generate_into_a_closed_pipe_is_quiet(tiny_run):
    res = _with_closed_stdout("generate", "--checkpoint", str(tiny_run), "--prompt", "The", "--max-new-tokens", "20",
                              "--device", "cpu")
    assert res.returncode == 141, res.stderr
    assert "Traceback" not in res.stderr and "BrokenPipeError" not in res.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from moeut.data import prepare
    from tests.data.helpers import make_documents
    from tests.train.conftest import train_args

    root = tmp_path_factory.mktemp("pipe")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(400)))
    prepare([str(corpus)], root / "data", vocab_size=400, val_fraction=0.05, progress=False)
    assert cli.main(train_args(root / "data", root / "run", steps=2)) == 0
    return root / "run"
