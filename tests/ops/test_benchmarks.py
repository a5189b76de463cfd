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


def test_model_step_benchmark_quick_compares_moeut_with_dense_in_both_precisions():
    out = _run(str(BENCH / "model_step.py"), "--quick", "--precision", "both")
    rows = {(r["preset"], r["precision"]): r for r in out["results"]}
    assert list(rows) == [("moeut-tiny", "fp32"), ("moeut-tiny", "bf16"), ("dense-tiny", "fp32"),
                          ("dense-tiny", "bf16")]
    for r in rows.values():
        assert r["step_ms"] > 0 and r["peak_memory_mb"] >= 0 and r["params"] > 4_000_000
        assert isinstance(r["native_bf16"], bool) and r["device"]
    assert [(p["precision"], p["step_time_ratio"]) for p in out["pairs"]] == [
        (q, round(rows[("moeut-tiny", q)]["step_ms"] / rows[("dense-tiny", q)]["step_ms"], 3)) for q in ("fp32", "bf16")]
    speed = {s["preset"]: s["speedup"] for s in out["bf16_speedup"]}
    assert speed["moeut-tiny"] == round(rows[("moeut-tiny", "fp32")]["step_ms"] / rows[("moeut-tiny", "bf16")]["step_ms"], 3)


def test_cvmm_throughput_benchmark_quick_on_cpu():
    out = _run(str(BENCH / "cvmm_tflops.py"), "--device", "cpu", "--quick", "--backend", "torch", "--dtype", "float32")
    assert [r["projection"] for r in out["results"]] == ["sigma_moe_up", "sigma_moe_down", "switchhead_v",
                                                          "switchhead_o"]
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ratio_to_dense"] > 0 for r in out["results"])


def test_gpu_check_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)


def test_gpu_check_dry_run_assembles_gpu_json(tmp_path):
    """`gpu_check.sh --dry-run` on CPU: every script parses its arguments, the quick runs work, and gpu.json has
    the issue's keys with exactly five goals (null here: nothing at 244M shapes is measured on CPU)."""
    env = {**ENV, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert doc["dry_run"] is True and doc["device"] == "cpu" and doc["torch"]
    assert set(doc["goals"]) == {"kernel_speedup_vs_reference", "kernel_fraction_of_cublas",
                                 "step_ratio_moeut_244m_vs_dense", "memory_ratio_moeut_244m_vs_dense",
                                 "step_speedup_vs_reference_model_244m"}
    assert all(v is None for v in doc["goals"].values()) and set(doc["goals_missing"]) == set(doc["goals"])
    assert len(doc["rows"]["cvmm_tflops"]) == 4 and doc["rows"]["model_step"]


def test_gpu_json_goals_from_rows(tmp_path):
    """The goal arithmetic on hand-written rows (geometric means and ratios)."""
    rows = [{"projection": p, "d_in": 1024, "backend": b, "fwd_bwd_ms": ms, "fwd_bwd_ratio_to_dense": r}
            for p, b, ms, r in [("up", "triton", 1.0, 0.5), ("down", "triton", 2.0, 0.8),
                                ("up", "moeut_reference", 3.0, 0.1), ("down", "moeut_reference", 8.0, 0.1)]]
    (tmp_path / "cvmm_tflops.json").write_text(json.dumps({"results": rows}))
    steps = [{"preset": "moeut-244m", "step_ms": 90.0, "peak_memory_mb": 600},
             {"preset": "dense-244m", "step_ms": 100.0, "peak_memory_mb": 1000},
             {"preset": "reference-moeut-244m", "step_ms": 180.0, "peak_memory_mb": 900}]
    (tmp_path / "model_step.json").write_text(json.dumps({"results": steps, "pairs": []}))
    subprocess.run([sys.executable, str(BENCH / "gpu_json.py"), str(tmp_path), str(tmp_path / "g.json")],
                   check=True, capture_output=True)
    g = json.loads((tmp_path / "g.json").read_text())["goals"]
    assert g["kernel_speedup_vs_reference"] == round((3.0 * 4.0) ** 0.5, 4)
    assert g["kernel_fraction_of_cublas"] == round((0.5 * 0.8) ** 0.5, 4)
    assert g["step_ratio_moeut_244m_vs_dense"] == 0.9 and g["memory_ratio_moeut_244m_vs_dense"] == 0.6
    assert g["step_speedup_vs_reference_model_244m"] == 2.0


def test_bf16_probe_quick_times_fixed_varying_and_bucketed_gemm_shapes():
    out = _run(str(BENCH / "bf16_probe.py"), "--quick")
    assert isinstance(out["native_bf16"], bool) and out["cpu"]
    assert {(r["dtype"], r["op"]) for r in out["gemm"]} == {(d, o) for d in ("float32", "bfloat16")
                                                            for o in ("mm", "wgrad")}
    for r in out["gemm"]:
        assert r["fixed_ms"] > 0 and r["varying_ms"] > 0 and r["unseen_ms"] > 0 and r["bucketed_ms"] > 0
        assert abs(r["varying_over_fixed"] - r["varying_ms"] / r["fixed_ms"]) < 0.01 * r["varying_over_fixed"] + 1e-3
        assert abs(r["unseen_over_fixed"] - r["unseen_ms"] / r["fixed_ms"]) < 0.01 * r["unseen_over_fixed"] + 1e-3
    assert [g["dtype"] for g in out["glue"]] == ["float32", "bfloat16"]
    assert all(g["gather_ms"] > 0 and g["slot_sum_ms"] > 0 and g["gate_mul_ms"] > 0 for g in out["glue"])
    assert set(out["summary"]) == {"bf16_varying_over_fixed_median", "bf16_unseen_over_fixed_median",
                                   "bf16_bucketed_over_fixed_median"}
