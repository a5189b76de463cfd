"""Smoke runs of the speed benchmarks (no timing assertions): they keep working and print valid JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(*args: str) -> dict:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_model_step_benchmark_quick_compares_moeut_with_dense():
    out = _run(str(BENCH / "model_step.py"), "--quick")
    presets = [r["preset"] for r in out["results"]]
    assert presets == ["moeut-tiny", "dense-tiny"]
    for r in out["results"]:
        assert r["step_ms"] > 0 and r["peak_memory_mb"] >= 0 and r["params"] > 4_000_000
    pair = out["pairs"][0]
    assert pair["step_time_ratio"] == round(out["results"][0]["step_ms"] / out["results"][1]["step_ms"], 3)


def test_cvmm_throughput_benchmark_quick_on_cpu():
    out = _run(str(BENCH / "cvmm_tflops.py"), "--device", "cpu", "--quick", "--backend", "torch", "--dtype", "float32")
    assert [r["projection"] for r in out["results"]] == ["sigma_moe_up", "sigma_moe_down", "switchhead_v",
                                                          "switchhead_o"]
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ratio_to_dense"] > 0 for r in out["results"])


def test_gpu_check_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)
