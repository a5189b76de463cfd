"""``--model balancing=loss_free`` end to end: the trainer moves the selection bias after every step from the
step's (global) expert loads, logs the max/min load per distinct layer, checkpoints the bias (resume is bit
for bit), ``moeut eval`` reads it, and 2 gloo ranks (DDP, FSDP2) equal 1 process with the same bias on both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeut.cli import main
from moeut.run import latest_checkpoint
from moeut.run.checkpoint import list_checkpoints
from moeut.train.metrics import balance_stats
from tests.run_helpers import torchrun_cmd
from tests.train.conftest import assert_same_run, train_args

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
CHILD = Path(__file__).with_name("loss_free_child.py")


def _args(data: Path, out: Path, *more: str, **kw) -> list[str]:
    return [*train_args(data, out, **kw), "--model", "balancing=loss_free", *more]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _biases(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state["model"].items() if k.endswith(("sel_bias", "sel_v_bias", "sel_o_bias"))}


def test_balance_stats_are_loads_relative_to_the_mean():
    stats = balance_stats({"ffn": torch.tensor([[5, 1, 3, 3], [3, 3, 3, 3]])})
    assert stats["balance/ffn/L0/max_load"] == 5 / 3 and stats["balance/ffn/L0/min_load"] == 1 / 3
    assert stats["balance/ffn/L1/max_load"] == stats["balance/ffn/L1/min_load"] == 1.0
    assert stats["balance/ffn/max_load"] == 5 / 3 and stats["balance/ffn/min_load"] == 1 / 3


@pytest.mark.slow
def test_loss_free_run_moves_the_bias_logs_the_load_and_resumes_bit_identically(tiny_data, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(_args(tiny_data, ref, "--model", "balancing_rate=0.01", steps=8, save_every=4, eval_every=4)) == 0
    state = latest_checkpoint(ref)[1]
    biases = _biases(state)
    assert sorted(biases) == sorted(f"layers.{g}.{n}" for g in range(2)
                                    for n in ("ffn.expert_sel_bias", "attention.sel_v_bias", "attention.sel_o_bias"))
    for k, b in biases.items():  # 8 steps of ±0.01 (or 0 at the exact mean): a multiple of 0.01, moved
        assert b.abs().max() > 0, k
        assert torch.allclose(b / 0.01, (b / 0.01).round(), atol=1e-4) and b.abs().max() <= 0.08 + 1e-6, k
    n_params = sum(1 for k in state["model"] if k not in biases)
    assert len(state["optimizer"]["state"]) == n_params  # the optimizer holds the parameters, not the biases
    lines = [m for m in _metrics(ref) if "train_loss" in m]
    assert len(lines) == 8
    for m in lines:  # every logged step: loads relative to the mean, per distinct layer and router kind
        for kind in ("ffn", "att_v", "att_o"):
            for g in range(2):
                assert m[f"balance/{kind}/L{g}/max_load"] >= 1.0 >= m[f"balance/{kind}/L{g}/min_load"] >= 0.0
        assert m["reg_loss"] == 0.0  # no entropy regulariser
    # resume from step 4 after losing the newest checkpoint: the same bias, weights and metrics
    assert main(_args(tiny_data, run, "--model", "balancing_rate=0.01", steps=8, save_every=4, eval_every=4)) == 0
    newest = list_checkpoints(run)[-1]
    newest.unlink()
    assert main([*_args(tiny_data, run, "--model", "balancing_rate=0.01", steps=8, save_every=4, eval_every=4),
                 "--resume"]) == 0
    assert_same_run(ref, run, 8)
    # evaluation of the run reads the bias
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(ref), "--tasks", "ppl", "--limit", "2", "--json", str(out),
                 "--no-progress"]) == 0
    assert out.is_file()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_ranks_match_one_process_and_keep_one_bias(tiny_data, tmp_path, mode):
    """2 ranks under DDP / FSDP2 (global loads: the counts are all-reduced before the update) equal 1 process: the
    losses, gradient norms and weights within the tolerance of test_train's two-rank test, the bias exactly; and
    after every update both ranks hold the same bias (FSDP2 does not shard or sync buffers)."""
    one, two = tmp_path / "one", tmp_path / "two"
    more = ("--model", "balancing_rate=0.01")
    assert main(_args(tiny_data, one, *more, steps=4, eval_every=0, save_every=2)) == 0
    dump = tmp_path / "bias"
    cmd = torchrun_cmd(2, str(CHILD), str(dump), *_args(tiny_data, two, *more, steps=4, eval_every=0, save_every=2),
                       *(["--fsdp"] if mode == "fsdp" else []))
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    keys = ("train_loss", "reg_loss", "grad_norm")
    ma = [m for m in _metrics(one) if "train_loss" in m]
    mb = [m for m in _metrics(two) if "train_loss" in m]
    assert len(ma) == len(mb) == 4
    for step, (a, b) in enumerate(zip(ma, mb), 1):
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (step, k, a, b)
        assert {k: v for k, v in a.items() if k.startswith("balance/")} == \
            {k: v for k, v in b.items() if k.startswith("balance/")}, step  # the same global loads
    wa, wb = latest_checkpoint(one)[1]["model"], latest_checkpoint(two)[1]["model"]
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    for k, v in _biases({"model": wa}).items():
        assert torch.equal(v, wb[k]), k
    rank0, rank1 = (torch.load(f"{dump}.{r}") for r in range(2))
    assert len(rank0) == len(rank1) == 4
    for step, (a, b) in enumerate(zip(rank0, rank1), 1):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step
    assert any(v.abs().sum() > 0 for v in rank1[-1].values())
