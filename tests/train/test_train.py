"""`moeut train` end to end: learning, exact resume after SIGKILL, several ranks, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moeut.cli import main
from moeut.data import prepare
from moeut.run import latest_checkpoint
from tests.data.helpers import make_documents
from tests.run_helpers import torchrun_cmd
from tests.train.conftest import train_args

# the child trains with as many threads as this process: float reductions, hence bits, depend on it
ROOT = Path(__file__).resolve().parents[2]  # children import this checkout's moeut (and tests/)
ENV = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_training_writes_run_directory_and_learns(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert main(train_args(tiny_data, run, steps=40, save_every=20)) == 0
    summary = json.loads((run / "summary.json").read_text())
    for key in ("step", "train_loss", "val_ppl", "tokens_seen", "wall_time_s"):
        assert key in summary
    assert summary["step"] == 40 and summary["tokens_seen"] == 40 * 4 * 32
    losses = [m["train_loss"] for m in _metrics(run) if "train_loss" in m]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5  # it learns
    assert summary["val_ppl"] < 400  # below a uniform guess over the 400-piece vocabulary
    assert any(k.startswith("routing/ffn/") for m in _metrics(run) for k in m)
    assert json.loads((run / "train_config.json").read_text())["steps"] == 40
    path, state = latest_checkpoint(run)
    assert state["step"] == 40 and json.loads(state["model_config"])["d_model"] == 32
    assert list((run / "tensorboard").iterdir())


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical_to_uninterrupted_run(tiny_data, tmp_path):
    steps = "60"
    ref = tmp_path / "ref"
    assert main(train_args(tiny_data, ref, steps=steps, save_every=3, eval_every=20)) == 0

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "moeut.cli", *train_args(tiny_data, run, steps=steps, save_every=3, eval_every=20)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = run / "checkpoints"
    deadline = time.time() + 120
    while not (ckpts.exists() and any(p.name.startswith("ckpt_") for p in ckpts.iterdir())):
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = latest_checkpoint(run)[1]["step"]
    assert killed_at < 60, "the process was not interrupted mid-run"

    assert main([*train_args(tiny_data, run, steps=steps, save_every=3, eval_every=20), "--resume"]) == 0
    a, b = latest_checkpoint(ref)[1], latest_checkpoint(run)[1]
    assert a["step"] == b["step"] == 60
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (ref, run))
    assert sa["train_loss"] == sb["train_loss"] and sa["val_ppl"] == sb["val_ppl"]
    timing = {"tok_per_s", "tflops", "mfu", "peak_memory_bytes"}  # measured, not computed: differ run to run
    strip = lambda ms: [{k: v for k, v in m.items() if k not in timing} for m in ms]  # noqa: E731
    assert strip(_metrics(ref)) == strip(_metrics(run))


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp-ac", "fsdp-ac"])
def test_two_gloo_ranks_match_one_process(tiny_data, tmp_path, mode):
    """Two ranks (DDP, FSDP2; "-ac": with activation checkpointing, against one process without it): the same
    losses, regulariser and gradient norms at every step, the same weights, and no warning about FSDP2's hooks."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = lambda out, steps=4: train_args(tiny_data, out, steps=steps, eval_every=0, save_every=2)  # noqa: E731
    assert main(args(one)) == 0
    extra = (["--fsdp"] if mode.startswith("fsdp") else []) + (["--activation-checkpointing"] if "ac" in mode else [])
    env = {**ENV, "OMP_NUM_THREADS": "1"}

    def torchrun(*more: str) -> str:
        res = subprocess.run(torchrun_cmd(2, "-m", "moeut.cli", *more), env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        return res.stdout + res.stderr

    output = torchrun(*args(two), *extra)
    # FSDP2 warns that a wrapped module "returned a view tensor" (a hook could be lost); wrap_model silences it
    # for the moeut modules, for which it is a false alarm (tests/train/test_fsdp_gathers.py), and this
    # comparison is what shows the gradients are right
    assert "returned a view tensor" not in output, output[-3000:]
    keys = ("train_loss", "reg_loss", "grad_norm")  # grad_norm: Adam's update hides a wrongly scaled gradient
    ma = [{k: m[k] for k in keys} for m in _metrics(one) if "train_loss" in m]
    mb = [{k: m[k] for k in keys} for m in _metrics(two) if "train_loss" in m]
    assert len(ma) == len(mb) == 4
    for step, (a, b) in enumerate(zip(ma, mb), 1):
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (step, k, a, b)
    wa, wb = latest_checkpoint(one)[1]["model"], latest_checkpoint(two)[1]["model"]
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    # the multi-rank checkpoint resumes (here: two more steps)
    torchrun(*args(two, steps=6), *extra, "--resume")
    assert latest_checkpoint(two)[1]["step"] == 6


# ------------------------------------------------------------------ bad input

def test_out_dir_holding_a_run_is_not_overwritten(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_data, run, steps=2)) == 0
    before = (run / "summary.json").read_text()
    assert main(train_args(tiny_data, run, steps=2)) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "summary.json").read_text() == before


def test_out_dir_with_foreign_files_is_refused(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    assert main(train_args(tiny_data, run, steps=2)) == 1
    assert "not a moeut run directory" in capsys.readouterr().err
    assert (run / "notes.txt").read_text() == "mine"


def test_resume_with_other_settings_is_refused(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_data, run, steps=2)) == 0
    assert main([*train_args(tiny_data, run, steps=4, lr=1e-3), "--resume"]) == 1
    assert "different configuration" in capsys.readouterr().err


def test_resume_with_data_of_another_tokenizer_is_refused(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_data, run, steps=2)) == 0
    other = tmp_path / "other"
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(300, seed=5)))
    prepare([str(corpus)], other, vocab_size=400, val_fraction=0.05, progress=False)
    assert main([*train_args(other, run, steps=4), "--resume"]) == 1
    assert "tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--preset", "moeut-9b"], "available presets"),
    (["--model", "ff_k=100"], "ModelConfig.ff_k=100"),
    (["--batch-size", "0"], "TrainConfig.batch_size=0"),
    (["--grad-accum", "3"], "TrainConfig.grad_accum=3"),
])
def test_bad_settings_name_the_field(tiny_data, tmp_path, capsys, args, message):
    assert main([*train_args(tiny_data, tmp_path / "run"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_data_dir_is_explained(tmp_path, capsys):
    assert main(train_args(tmp_path / "nope", tmp_path / "run")) != 0
    assert "moeut prepare" in capsys.readouterr().err


def test_truncated_shard_is_reported(tiny_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = next((data / "train").glob("*.bin"))
    shard.write_bytes(shard.read_bytes()[:-10])
    assert main(train_args(data, tmp_path / "run")) != 0
    assert shard.name in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_data, run, steps=6, lr=1e30, save_every=1, warmup=0, clip=0)) == 1
    err = capsys.readouterr().err
    assert "training stopped" in err
    path, state = latest_checkpoint(run)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("extra", [[], ["--activation-checkpointing"]], ids=["plain", "checkpointed"])
def test_compiled_training_matches_eager_and_checkpoints_load(tiny_data, tmp_path, monkeypatch, extra):
    from tests.run_helpers import load_model

    # the plumbing, not inductor's C++ codegen (minutes on 2 cores; tests/ops/test_library.py runs inductor)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, **{**kw, "backend": "aot_eager"}))

    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    common = dict(steps=3, eval_every=0, save_every=3, routing_every=0)
    assert main(train_args(tiny_data, eager, **common)) == 0
    assert main([*train_args(tiny_data, compiled, **common), "--compile", *extra]) == 0
    want = [m["train_loss"] for m in _metrics(eager) if "train_loss" in m]
    got = [m["train_loss"] for m in _metrics(compiled) if "train_loss" in m]
    assert len(got) == 3 and got == pytest.approx(want, rel=1e-4)
    model = load_model(compiled)  # parameter names without torch.compile's "_orig_mod." prefix
    assert not any("_orig_mod" in k for k in model.state_dict())
    assert json.loads((compiled / "summary.json").read_text())["val_ppl"] == pytest.approx(
        json.loads((eager / "summary.json").read_text())["val_ppl"], rel=1e-3)
