"""FSDP2 and shared layers: each distinct layer is all-gathered once per training step, not once per application."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.run_helpers import torchrun_cmd

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.6")


def _counts(*flags: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src") + os.pathsep + str(ROOT)}
    cmd = torchrun_cmd(2, str(ROOT / "tests" / "train" / "fsdp_count_child.py"), *flags)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("{")][-1])


def test_shared_layers_are_gathered_once_per_step_on_two_gloo_ranks():
    before = _counts("--per-application", "--applications", "3")
    after = _counts("--applications", "3")
    r, g = after["applications"], after["distinct_layers"]
    assert (r, g) == (3, 2)
    for step in before["per_step"]:  # FSDP2 defaults: every application, forward and backward, plus the root
        assert step["all_gathers"] == 2 * r * g + 1
    for step in after["per_step"]:  # once per distinct layer, plus the root; one reduce-scatter each
        assert step["all_gathers"] == g + 1 and step["reduce_scatters"] == g + 1
    assert after["loss"] == pytest.approx(before["loss"], rel=1e-6)  # same numbers, fewer collectives
