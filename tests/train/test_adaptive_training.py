"""The adaptive-depth preset (``moeut-tiny-adaptive``: halted tokens skip their work) end to end: it trains with
tokens freezing at several depths, logs the executed depth and MACs, resumes bit for bit, evaluates, generates
with the cache and exports to Hugging Face with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeut.cli import main
from moeut.model import ModelConfig
from moeut.model.accounting import model_stats
from moeut.run.checkpoint import list_checkpoints
from tests.train.conftest import assert_same_run, train_args

# 4 group applications; g_halt = σ(−1) and a low threshold: tokens freeze after 3 applications at first
ADAPTIVE = ["--model", "n_layers=8", "--model", "act_halt_bias_init=-1.0", "--model", "act_threshold=0.6"]


def _args(data: Path, out: Path, **kw) -> list[str]:
    args = train_args(data, out, **{"steps": 8, "save_every": 4, "eval_every": 4, **kw})
    args[args.index("moeut-tiny")] = "moeut-tiny-adaptive"
    return [*args, *ADAPTIVE]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_adaptive_preset_is_act_whose_halted_tokens_skip():
    cfg = ModelConfig.from_name("moeut-tiny-adaptive")
    tiny_act = ModelConfig.from_name("moeut-tiny-act")
    assert cfg.act and cfg.act_halting == "skip" and tiny_act.act_halting == "frozen"
    assert cfg.act_target_depth == 2.0 and cfg.act_depth_entropy > 0  # a budget of 2 of at most 4 applications
    assert cfg.replace(act_halting="frozen", act_target_depth=0.0, act_depth_entropy=0.0, act_target_rate=0.01,
                       act_penalty_rate=0.0, act_halt_bias_init=-3.0, act_threshold=0.999) == tiny_act


@pytest.mark.slow
def test_adaptive_run_logs_executed_depth_resumes_evaluates_generates_and_exports(tiny_data, tmp_path, capsys):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(_args(tiny_data, ref)) == 0
    lines = [m for m in _metrics(ref) if "train_loss" in m]
    assert len(lines) == 8
    executed = [m["act/executed_mean_depth"] for m in lines]
    shift = [m["act/halt_shift"] for m in lines]  # the budget's halting shift follows the executed depth's error
    rate = ModelConfig.from_name("moeut-tiny-adaptive").act_target_rate
    for e, before, after in zip(executed, [0.0, *shift], shift):
        assert after - before == pytest.approx(rate * ((e > 2.0) - (e < 2.0)), abs=1e-6)
    assert any(v != 0.0 for v in shift)
    penalty_rate, lam = ModelConfig.from_name("moeut-tiny-adaptive").act_penalty_rate, 0.0
    for e, m in zip(executed, lines):  # λ = max(0, λ + rate · (executed − target))
        lam = max(0.0, lam + penalty_rate * (e - 2.0))
        assert m["act/lambda"] == pytest.approx(lam, abs=1e-6)
    assert all(1.0 <= e < 4.0 for e in executed), executed  # tokens froze: fewer than 4 applications ran
    full = model_stats(ModelConfig.from_saved(json.loads((ref / "model_config.json").read_text())), 32)
    for m in lines:
        assert sum(m[f"act/executed_frac/{k}"] for k in range(1, 5)) == pytest.approx(1.0)
        assert m["act/executed_macs_per_token"] < full["macs_per_token"]
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["act_executed_depth"] == executed[-1]

    # resume from step 4 after losing the newest checkpoint: the same weights and metrics
    assert main(_args(tiny_data, run)) == 0
    list_checkpoints(run)[-1].unlink()
    assert main([*_args(tiny_data, run), "--resume"]) == 0
    assert_same_run(ref, run, 8)

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ref), "--tasks", "ppl"]) == 0
    assert "ppl " in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(ref), "--prompt", "the", "--max-new-tokens", "6",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()
    pytest.importorskip("transformers")
    assert main(["export-hf", "--checkpoint", str(ref), "--out", str(tmp_path / "hf")]) == 0  # verifies the logits
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["act_halting"] == "skip"
