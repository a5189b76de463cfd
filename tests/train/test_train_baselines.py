"""The tiny baselines train, resume bit for bit and evaluate through the same commands as MoEUT."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from moeut.cli import main
from moeut.cli.evaluate import add_arguments as add_eval_arguments, run as run_eval
from moeut.model import PRESETS
from moeut.run import latest_checkpoint
from moeut.run.checkpoint import list_checkpoints
from tests.train.conftest import train_args

FAMILIES = {
    "sigma-moe-tiny": dict(group_size=4, att_n_experts=1),
    "sut-tiny": dict(sample_topk=1),  # sampling in training: the RNG state must be restored on resume
    "sut-tiny-noact": dict(),
    "moeut-tiny-postln-aabb": dict(norm_placement="post", group_order="aabb"),
    "moeut-tiny-act": dict(n_layers=8),  # the preset itself (ACT, deep start) at the test's width: 4 groups
}


def _args(preset: str, data, out, **kw) -> list[str]:
    extra = FAMILIES[preset]
    base = preset if preset in PRESETS else "moeut-tiny"
    args = train_args(data, out, steps=8, save_every=4, eval_every=4, **kw)
    args[args.index("--preset") + 1] = base
    for k, v in extra.items():
        args += ["--model", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    return args


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(FAMILIES))
def test_tiny_family_trains_resumes_bit_identically_and_evaluates(preset, tiny_data, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(_args(preset, tiny_data, ref)) == 0
    assert main(_args(preset, tiny_data, run)) == 0
    newest = list_checkpoints(run)[-1]
    newest.unlink()  # as if killed after the step-4 checkpoint
    assert latest_checkpoint(run)[1]["step"] == 4
    assert main([*_args(preset, tiny_data, run), "--resume"]) == 0
    a, b = latest_checkpoint(ref)[1], latest_checkpoint(run)[1]
    assert a["step"] == b["step"] == 8
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    cfg = json.loads(a["model_config"])
    for k, v in FAMILIES[preset].items():
        assert cfg[k] == v
    assert cfg["act"] == (preset in ("sut-tiny", "moeut-tiny-act"))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    depths = [m["act/mean_depth"] for m in logged if "act/mean_depth" in m]
    if cfg["act"]:
        max_depth = cfg["n_layers"] // cfg["group_size"]
        assert len(depths) == 8 and all(1 <= d <= max_depth for d in depths)
        last = next(m for m in reversed(logged) if "act/mean_depth" in m)
        assert sum(last[f"act/depth_frac/{k}"] for k in range(1, max_depth + 1)) == pytest.approx(1)
        assert last["act/depth_p10"] <= last["act/depth_p50"] <= last["act/depth_p90"]
        assert json.loads((run / "summary.json").read_text())["act_mean_depth"] == last["act/mean_depth"]
    else:
        assert not depths

    p = argparse.ArgumentParser()
    add_eval_arguments(p)
    out = tmp_path / "ppl.json"
    assert run_eval(p.parse_args(["--checkpoint", str(run), "--tasks", "ppl", "--limit", "1", "--json", str(out),
                                  "--no-progress"])) == 0
    assert 1 < json.loads(out.read_text())["ppl"]["ppl"] < 400 * 2
