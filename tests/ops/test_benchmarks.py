"""The speed benchmarks: their measurement code times and sizes what it claims (with stand-in work of known
cost), gpu_check.sh runs the steps it should, and the quick runs keep working and print valid JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(*args: str) -> dict:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


# run_one with train_step replaced by a stand-in of known cost: an instant warm-up step (counted, it would be
# the minimum), then timed steps of 50 ms, the first of which raises the process's peak resident set by 64 MiB
# (it allocates and keeps the peak's headroom, the part of the earlier peak not resident now, plus 64 MiB)
MODEL_STEP_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import moeut.train
import model_step

calls, held = [], []

def fake_train_step(model, opt, batch, *, grad_clip, autocast):
    calls.append({"batch": batch.tolist(), "clip": grad_clip,
                  "autocast": None if autocast is None else [autocast.device, str(autocast.fast_dtype)]})
    if len(calls) == 2:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss_kib = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() // 1024
        held.append(torch.ones((max(0, peak_kib - rss_kib) * 1024 + (64 << 20)) // 4))
    time.sleep(0.05 if len(calls) > 1 else 0.0)

moeut.train.train_step = fake_train_step
row = model_step.run_one("moeut-tiny", "cpu", 2, 8, 1, 3, None, sys.argv[2])
print(json.dumps({"row": row, "calls": calls}))
"""


def test_model_step_times_and_sizes_the_training_step_it_runs():
    """run_one's own measurement path: the median of the timed steps only (not the warm-up), a new batch per
    step of the requested shape, the precision's autocast passed on, and the memory the step allocated."""
    proc = subprocess.run([sys.executable, "-c", MODEL_STEP_CHILD, str(BENCH), "bf16"], capture_output=True,
                          text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    row, calls = got["row"], got["calls"]
    assert len(calls) == 1 + 3  # warm-up + reps
    batches = [c["batch"] for c in calls]
    assert all(len(b) == 2 and all(len(seq) == 8 + 1 for seq in b) for b in batches)  # [batch, seq_len + 1]
    assert len({json.dumps(b) for b in batches}) == 4, "the same batch was reused"
    assert all(c["autocast"] == ["cpu", "torch.bfloat16"] and c["clip"] == 0.25 for c in calls)
    assert 50 <= row["min_step_ms"] <= row["step_ms"] < 50 + 60, row  # 50 ms steps; the warm-up left out
    assert row["reps"] == 3 and row["warmup"] == 1 and row["tokens_per_step"] == 16 and row["precision"] == "bf16"
    assert 60 <= row["peak_memory_mb"] < 64 + 16, row  # the step's 64 MiB above the earlier peak


@pytest.mark.slow
def test_model_step_benchmark_quick_runs_moeut_and_dense_in_both_precisions():
    out = _run(str(BENCH / "model_step.py"), "--quick", "--precision", "both")
    rows = {(r["preset"], r["precision"]): r for r in out["results"]}
    assert list(rows) == [("moeut-tiny", "fp32"), ("moeut-tiny", "bf16"), ("dense-tiny", "fp32"),
                          ("dense-tiny", "bf16")]
    for r in rows.values():
        assert "error" not in r and r["step_ms"] > 0 and r["peak_memory_mb"] >= 0 and r["params"] > 4_000_000
        assert isinstance(r["native_bf16"], bool) and r["device"] and r["reps"] == 1 and r["tokens_per_step"] == 64
    assert [(p["moeut"], p["dense"], p["precision"]) for p in out["pairs"]] == [
        ("moeut-tiny", "dense-tiny", "fp32"), ("moeut-tiny", "dense-tiny", "bf16")]
    assert [(p["moeut_step_ms"], p["dense_step_ms"]) for p in out["pairs"]] == [
        (rows[("moeut-tiny", q)]["step_ms"], rows[("dense-tiny", q)]["step_ms"]) for q in ("fp32", "bf16")]
    assert [s["preset"] for s in out["bf16_speedup"]] == ["moeut-tiny", "dense-tiny"]


@pytest.mark.slow
def test_cvmm_throughput_benchmark_quick_on_cpu():
    out = _run(str(BENCH / "cvmm_tflops.py"), "--device", "cpu", "--quick", "--backend", "torch", "--dtype", "float32")
    assert [r["projection"] for r in out["results"]] == ["sigma_moe_up", "sigma_moe_down", "switchhead_v",
                                                          "switchhead_o"]
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ratio_to_dense"] > 0 for r in out["results"])


# Stands in for python in gpu_check.sh: logs its arguments, answers --help, prints the canned JSON of a
# benchmark (exiting with $FAIL_<name> if set), and runs the real interpreter for the environment step
# (`python - versions.json`) and for gpu_json.py, so the assembled gpu.json is the real one.
FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$LOG"
case "$1" in
  -|benchmarks/gpu_json.py) exec "$REAL_PYTHON" "$@" ;;
  benchmarks/*.py)
    for a in "$@"; do [ "$a" = --help ] && exit 0; done
    name=$(basename "$1" .py)
    cat "$CANNED/$name.json"
    fail="FAIL_$name"; exit "${!fail:-0}" ;;
  *) echo "gpu_check.sh ran something unexpected: $*" >&2; exit 97 ;;
esac
"""


def _gpu_check_with_fake_python(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run gpu_check.sh with FAKE_PYTHON: (the process, the python command lines it ran, in order)."""
    fake, canned, log = tmp_path / "python", tmp_path / "canned", tmp_path / "calls.log"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    canned.mkdir(exist_ok=True)
    cvmm = {"results": [{"projection": p, "d_in": 32, "backend": "torch", "fwd_bwd_ms": 1.0,
                         "fwd_bwd_ratio_to_dense": 0.5} for p in ("a", "b", "c", "d")]}
    step = {"results": [{"preset": "moeut-tiny", "step_ms": 3.0, "peak_memory_mb": 1.0},
                        {"preset": "dense-tiny", "step_ms": 2.0, "peak_memory_mb": 1.0}], "pairs": [{"x": 1}]}
    (canned / "cvmm_tflops.json").write_text(json.dumps(cvmm))
    (canned / "model_step.json").write_text(json.dumps(step))
    full = {k: v for k, v in ENV.items() if k != "MOEUT_GPU_CHECK_DRY_RUN"}
    full.update(OUT=str(tmp_path / "out"), PYTHON=str(fake), REAL_PYTHON=sys.executable, CANNED=str(canned),
                LOG=str(log), **env)
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), *args], capture_output=True, text=True, timeout=120,
                          env=full)
    return proc, log.read_text().splitlines() if log.exists() else []


def test_gpu_check_dry_run_runs_the_cpu_steps_and_assembles_gpu_json_in_out(tmp_path):
    """What `gpu_check.sh --dry-run` does, with the benchmarks stubbed (the real run is the slow test below):
    every script's --help, the two CPU --quick runs with their arguments, their JSON saved to $OUT, and
    gpu.json assembled there from it by gpu_json.py --dry-run; no CUDA step, no test run, nothing written to
    benchmarks/results/."""
    results = BENCH / "results" / "gpu.json"
    before = results.stat().st_mtime_ns if results.exists() else None
    proc, calls = _gpu_check_with_fake_python(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = tmp_path / "out"
    assert calls == [
        f"- {out}/versions.json",
        "benchmarks/cvmm_tflops.py --help", "benchmarks/moe_layer.py --help", "benchmarks/model_step.py --help",
        "benchmarks/gpu_json.py --help",
        "benchmarks/cvmm_tflops.py --device cpu --quick --backend torch --dtype float32",
        "benchmarks/model_step.py --quick",
        f"benchmarks/gpu_json.py {out} {out}/gpu.json --dry-run",
    ]
    assert json.loads((out / "cvmm_tflops.json").read_text()) == json.loads((tmp_path / "canned/cvmm_tflops.json").read_text())
    assert json.loads((out / "tests.json").read_text()) == {"skipped": "dry run: no CUDA tests"}
    doc = json.loads((out / "gpu.json").read_text())
    assert doc["dry_run"] is True and doc["device"] == "cpu" and doc["torch"] == torch.__version__
    assert doc["rows"]["cvmm_tflops"][0]["projection"] == "a" and doc["pairs"] == [{"x": 1}]
    assert doc["tests"] == {"skipped": "dry run: no CUDA tests"}
    assert all(v is None for v in doc["goals"].values()), doc["goals"]  # CPU shapes are not the 244M goals
    assert (results.stat().st_mtime_ns if results.exists() else None) == before


def test_gpu_check_dry_run_from_the_environment_and_a_failing_step(tmp_path):
    """MOEUT_GPU_CHECK_DRY_RUN=1 is --dry-run; a failing step makes the exit status 1, yet the later steps
    still run and gpu.json is still written (a GPU session gets every number the other steps produced)."""
    proc, calls = _gpu_check_with_fake_python(tmp_path, MOEUT_GPU_CHECK_DRY_RUN="1", FAIL_cvmm_tflops="3")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert calls[-2:] == ["benchmarks/model_step.py --quick",
                          f"benchmarks/gpu_json.py {tmp_path / 'out'} {tmp_path / 'out'}/gpu.json --dry-run"]
    assert not any("--device cuda" in c or "-m pytest" in c for c in calls)
    assert json.loads((tmp_path / "out" / "gpu.json").read_text())["dry_run"] is True


@pytest.mark.slow
@pytest.mark.timeout(660)
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


# gemm_rows with torch.mm recording the row count of every multiplication (per timed phase: fixed, varying,
# unseen, bucketed), and _time on a stand-in of 4 ms per call
BF16_PROBE_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import bf16_probe as bp

phases, real_time, real_mm = [], bp._time, torch.mm

def timed(fn, calls, rounds):
    phases.append([])
    return real_time(fn, calls, rounds)

def mm(a, b):
    phases[-1].append([a.shape[0], b.shape[0]])  # mm: a is [m, k]; wgrad: b (the output gradient) is [m, n]
    return real_mm(a, b)

torch.mm, bp._time = mm, timed
out = {}
for wgrad in (False, True):
    phases.clear()
    bp.gemm_rows(torch.float32, 64, 8, 8, wgrad, calls=8, rounds=2, bucket=16, spread=32)
    out["wgrad" if wgrad else "mm"] = [[p[1] if wgrad else p[0] for p in ph] for ph in phases]
out["sleep_ms"] = real_time(lambda c: time.sleep(0.004 * c), 5, 3)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def bf16_probe_shapes() -> dict:
    proc = subprocess.run([sys.executable, "-c", BF16_PROBE_CHILD, str(BENCH)], capture_output=True, text=True,
                          timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bf16_probe_multiplies_the_row_counts_it_describes_and_times_per_call(bf16_probe_shapes):
    """bf16_probe's measurement path: _time reports ms per call (median over rounds, warm-up round left out);
    each GEMM family's four phases multiply what the docstring says: one row count (fixed), a set of counts
    repeated every round (varying), a new count on every call centred on the fixed one (unseen), and the
    varying counts rounded up to the bucket (bucketed)."""
    got = bf16_probe_shapes
    assert 4 <= got["sleep_ms"] < 4 + 3, got["sleep_ms"]
    calls, rounds, rows, bucket, spread = 8, 2, 64, 16, 32
    for op in ("mm", "wgrad"):
        fixed, varying, unseen, bucketed = got[op]
        assert all(len(ph) == calls * (rounds + 1) for ph in got[op])  # warm-up round + timed rounds
        assert set(fixed) == {rows}
        rnds = [varying[i * calls:(i + 1) * calls] for i in range(rounds + 1)]
        assert rnds[0] == rnds[1] == rnds[2] and len(set(rnds[0])) > calls // 2, rnds
        assert all(rows - spread // 2 <= m < rows + spread // 2 for m in varying)
        assert len(set(unseen)) == len(unseen), "an 'unseen' row count repeats"
        assert abs(sum(unseen) / len(unseen) - rows) <= 1  # comparable FLOPs
        assert bucketed == [-(-m // bucket) * bucket for m in varying]


def test_bf16_probe_unseen_row_counts_were_never_multiplied_before(bf16_probe_shapes):
    got = bf16_probe_shapes
    for op in ("mm", "wgrad"):
        fixed, varying, unseen, _ = got[op]
        assert not set(unseen) & (set(fixed) | set(varying)), sorted(set(unseen) & (set(fixed) | set(varying)))


@pytest.mark.slow
def test_bf16_probe_quick_times_fixed_varying_and_bucketed_gemm_shapes():
    out = _run(str(BENCH / "bf16_probe.py"), "--quick")
    assert isinstance(out["native_bf16"], bool) and out["cpu"]
    assert {(r["dtype"], r["op"]) for r in out["gemm"]} == {(d, o) for d in ("float32", "bfloat16")
                                                            for o in ("mm", "wgrad")}
    for r in out["gemm"]:
        assert r["fixed_ms"] > 0 and r["varying_ms"] > 0 and r["unseen_ms"] > 0 and r["bucketed_ms"] > 0
    assert [g["dtype"] for g in out["glue"]] == ["float32", "bfloat16"]
    assert all(g["gather_ms"] > 0 and g["slot_sum_ms"] > 0 and g["gate_mul_ms"] > 0 for g in out["glue"])
    assert set(out["summary"]) == {"bf16_varying_over_fixed_median", "bf16_unseen_over_fixed_median",
                                   "bf16_bucketed_over_fixed_median"}
