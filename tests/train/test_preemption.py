"""Stopping and continuing a run as a user and a cluster do: Ctrl-C, SIGTERM, a second Ctrl-C, a run that
resumes from its directory alone (moved or copied too), and logs that hold each step once."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moeut.cli import main
from moeut.run import latest_checkpoint, list_checkpoints
from moeut.train.trainer import Trainer
from tests.run_helpers import torchrun_cmd
from tests.train.conftest import train_args

ROOT = Path(__file__).resolve().parents[2]
# the child trains with as many threads as this process: float reductions, hence bits, depend on it
ENV = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
       "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
TIMING = {"tok_per_s", "tflops", "mfu", "peak_memory_bytes"}  # measured, not computed: differ run to run
STEPS = 30


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _computed(run: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING} for m in _metrics(run)]


def _args(data: Path, run: Path, **kw) -> list[str]:
    return train_args(data, run, **{"steps": STEPS, "save_every": 0, "eval_every": 10, **kw})


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must equal."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(_args(tiny_data, run)) == 0
    return run


def _assert_same_run(ref: Path, run: Path) -> None:
    a, b = latest_checkpoint(ref)[1], latest_checkpoint(run)[1]
    assert a["step"] == b["step"] == STEPS
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["val_ppl"] == b["val_ppl"]
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (ref, run))
    for key in ("step", "train_loss", "reg_loss", "val_ppl", "tokens_seen", "grad_norm"):
        assert sa[key] == sb[key], key
    assert _computed(ref) == _computed(run)  # every step logged once, with the same numbers, in the same order


def _signal_at(monkeypatch, at: dict[int, list[int]]) -> None:
    """Deliver real signals to this process right after the given steps' logging (mid-loop, handlers live)."""
    log = Trainer.log

    def log_then_signal(self, done, res, console):
        log(self, done, res, console)
        for sig in at.get(done, []):
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(Trainer, "log", log_then_signal)


@pytest.mark.slow
@pytest.mark.parametrize("sig, step", [(signal.SIGINT, 10), (signal.SIGTERM, 13)])
def test_signal_checkpoints_the_step_and_resume_is_bit_identical(tiny_data, reference, tmp_path, monkeypatch,
                                                                 capsys, sig, step):
    """Step 10 is an evaluation step: stopping leaves the evaluation to the resumed run, which logs it at step 10
    as the uninterrupted run did. Step 13 is an ordinary step (no checkpoint is scheduled before the end)."""
    run = tmp_path / "run"
    _signal_at(monkeypatch, {step: [sig]})
    assert main(_args(tiny_data, run)) == 128 + sig
    err = capsys.readouterr().err
    assert f"stopped by {signal.Signals(sig).name} after step {step} of {STEPS}" in err
    assert f"Resume with: moeut train --resume --out {run}" in err
    assert [p.name for p in list_checkpoints(run)] == [f"ckpt_{step:08d}.pt"]
    assert json.loads((run / "summary.json").read_text())["step"] == step
    assert max(m["step"] for m in _metrics(run)) == step
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    monkeypatch.undo()
    assert main(["train", "--resume", "--out", str(run), "--no-progress"]) == 0  # nothing else: the run's settings
    _assert_same_run(reference, run)


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(_args(tiny_data, run, steps=4, save_every=4)) == 0
    good = latest_checkpoint(run)[1]
    _signal_at(monkeypatch, {6: [signal.SIGINT, signal.SIGINT]})
    assert main(_args(tiny_data, run, steps=12, save_every=4) + ["--resume", "--allow-schedule-change"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["ckpt_00000004.pt"]  # no step 6, no temp file
    kept = latest_checkpoint(run)[1]
    assert all(torch.equal(good["model"][k], kept["model"][k]) for k in good["model"])


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, f"training ended before step {step}: {proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, f"no step {step} after {timeout} s"
        try:
            if any(m["step"] >= step for m in _metrics(run)):
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_a_training_process_at_a_random_step(tiny_data, reference, tmp_path, sig):
    """A real process, a real signal at a random step (the run logs every step, checkpoints only at the end)."""
    at = random.randint(2, STEPS - 8)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "moeut.cli", *_args(tiny_data, run)], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_step(proc, run, at)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    stopped = latest_checkpoint(run)[1]["step"]
    assert at <= stopped < STEPS, f"signal sent after step {at}"
    assert f"stopped by {signal.Signals(sig).name} after step {stopped}" in err

    assert main(["train", "--resume", "--out", str(run), "--no-progress"]) == 0
    _assert_same_run(reference, run)


@pytest.mark.slow
def test_sigterm_to_one_of_two_gloo_ranks_stops_both_at_the_same_step(tiny_data, tmp_path):
    """SIGTERM reaches rank 1 only: both ranks agree on the step, rank 0 writes its checkpoint, and the resumed
    two-rank run equals an uninterrupted two-rank run bit for bit."""
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    args = lambda out: _args(tiny_data, out, steps=24, eval_every=8)  # noqa: E731

    def torchrun(*more: str) -> subprocess.CompletedProcess:
        return subprocess.run(torchrun_cmd(2, "-m", "moeut.cli", *more), env=env, capture_output=True, text=True,
                              timeout=300)

    ref = tmp_path / "ref"
    res = torchrun(*args(ref))
    assert res.returncode == 0, res.stderr[-3000:]

    run = tmp_path / "run"
    proc = subprocess.Popen(torchrun_cmd(2, "-m", "moeut.cli", *args(run)), env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    at = random.randint(2, 14)
    _wait_for_step(proc, run, at)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    stopped = latest_checkpoint(run)[1]["step"]
    assert at <= stopped < 24, f"signal sent after step {at}"
    assert f"stopped by SIGTERM after step {stopped} of 24" in err, err[-3000:]
    assert "moeut.cli train --resume --out" in err

    res = torchrun("train", "--resume", "--out", str(run), "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = latest_checkpoint(ref)[1], latest_checkpoint(run)[1]
    assert a["step"] == b["step"] == 24
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert _computed(ref) == _computed(run)


def _rank_pid(torchrun_pid: int, rank: int, timeout: float = 60) -> int:
    """The pid of the torchrun worker with RANK=rank (a child of the torchrun process)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        children = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()
        for pid in children:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank} under torchrun pid {torchrun_pid}")


# ------------------------------------------------------------------ resuming from the directory


@pytest.mark.slow
def test_a_moved_or_copied_run_resumes_from_its_directory(tiny_data, reference, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(tiny_data, run, steps=12, save_every=6)) == 0
    moved = tmp_path / "moved"
    shutil.move(run, moved)
    # the steps may grow on resume; the cosine's would change, so it needs the explicit permission
    assert main(["train", "--resume", "--out", str(moved), "--steps", "14", "--allow-schedule-change",
                 "--no-progress"]) == 0
    assert latest_checkpoint(moved)[1]["step"] == 14
    assert json.loads((moved / "train_config.json").read_text())["out"] == str(moved)

    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    assert main(["train", "--config", str(copy / "train_config.json"), "--out", str(copy), "--resume",
                 "--steps", "16", "--allow-schedule-change", "--no-progress"]) == 0
    assert latest_checkpoint(copy)[1]["step"] == 16


@pytest.mark.slow
def test_a_refused_resume_lists_each_field_with_both_values(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(tiny_data, run, steps=2)) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "--lr", "1e-3", "--seed", "7"]) == 1
    err = capsys.readouterr().err
    assert "lr: 0.003 in the run, 0.001 now" in err and "seed: 0 in the run, 7 now" in err
    assert "'out'" not in err and "out:" not in err


def test_resume_of_a_directory_without_a_run_asks_for_the_settings(tmp_path, capsys):
    assert main(["train", "--resume", "--out", str(tmp_path / "nothing")]) == 2
    assert "--data is required" in capsys.readouterr().err


# ------------------------------------------------------------------ logs that match the checkpoint


def _tensorboard_steps(run: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()  # applies the purge markers that resumed writers leave (purge_step)
    return [e.step for e in acc.Scalars(tag)]


@pytest.mark.slow
@pytest.mark.parametrize("save_every", [0, 5])
def test_killed_between_checkpoints_then_resumed_logs_each_step_once(tiny_data, reference, tmp_path, save_every):
    """SIGKILL (no chance to save) after the last checkpoint — or before any (save_every 0): the resumed run
    drops what the killed one logged after its checkpoint, in metrics.jsonl and in TensorBoard."""
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "moeut.cli", *_args(tiny_data, run, save_every=save_every)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, run, 12)
    proc.kill()
    proc.communicate()
    saved = latest_checkpoint(run)
    assert (saved[1]["step"] if saved else 0) < max(m["step"] for m in _metrics(run)), "nothing to roll back"

    assert main(["train", "--resume", "--out", str(run), "--no-progress", "--save-every", "0"]) == 0
    steps = [m["step"] for m in _metrics(run) if "train_loss" in m]
    assert steps == list(range(1, STEPS + 1))
    assert _tensorboard_steps(run, "train_loss") == list(range(1, STEPS + 1))
    assert _computed(reference) == _computed(run)


def test_time_based_checkpoints(tiny_data, tmp_path, monkeypatch):
    """--save-every-minutes: a checkpoint whenever that much time has passed since the last one."""
    clock = iter(range(0, 10_000, 30))  # each look at the clock: 30 s later
    monkeypatch.setattr("moeut.train.trainer._monotonic", lambda: float(next(clock)))
    run = tmp_path / "run"
    assert main(_args(tiny_data, run, steps=6, keep=10, save_every_minutes=1)) == 0
    steps = sorted(int(p.name[5:13]) for p in list_checkpoints(run))
    assert len(steps) >= 3 and steps[-1] == 6  # about every other step, and the end
