"""Assemble ``gpu.json`` (issue 14) from the step outputs of ``benchmarks/gpu_check.sh``.

    python benchmarks/gpu_json.py OUT_DIR DEST [--dry-run]

Reads ``OUT_DIR/{versions,cvmm_tflops,cvmm_tflops_torch_backend,moe_layer,model_step,tests}.json`` (those
present), keeps every measured row, and computes the ``goals`` object with exactly five keys. A goal whose
rows were not measured is ``null`` and ``goals_missing`` says why; nothing is estimated or filled in.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

GOAL_KEYS = ("kernel_speedup_vs_reference", "kernel_fraction_of_cublas", "step_ratio_moeut_244m_vs_dense",
             "memory_ratio_moeut_244m_vs_dense", "step_speedup_vs_reference_model_244m")
STEPS = ("cvmm_tflops", "cvmm_tflops_torch_backend", "moe_layer", "model_step")


def _geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x and x > 0]
    return round(math.exp(sum(map(math.log, xs)) / len(xs)), 4) if xs else None


def _load(path: Path):
    if not path.exists() or not path.stat().st_size:
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return {"error": f"{path.name} is not JSON: {e}"}


def goals(steps: dict) -> tuple[dict, dict]:
    """``(goals, missing)`` from the loaded step outputs."""
    g, missing = dict.fromkeys(GOAL_KEYS), {}
    rows = [r for r in (steps.get("cvmm_tflops") or {}).get("results", []) if r.get("d_in") in (1024, 128)]
    ours = [r for r in rows if r.get("backend") != "moeut_reference"]
    ref = {r["projection"]: r for r in rows if r.get("backend") == "moeut_reference"}
    g["kernel_fraction_of_cublas"] = _geomean([r["fwd_bwd_ratio_to_dense"] for r in ours])
    if g["kernel_fraction_of_cublas"] is None:
        missing["kernel_fraction_of_cublas"] = "no cvmm_tflops rows at the 244M shapes"
    g["kernel_speedup_vs_reference"] = _geomean([ref[r["projection"]]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
                                                for r in ours if r["projection"] in ref])
    if g["kernel_speedup_vs_reference"] is None:
        missing["kernel_speedup_vs_reference"] = "no rows of the authors' kernel (backend moeut_reference)"
    res = {r["preset"]: r for r in (steps.get("model_step") or {}).get("results", []) if "step_ms" in r}
    if "moeut-244m" in res and "dense-244m" in res:
        m, d = res["moeut-244m"], res["dense-244m"]
        g["step_ratio_moeut_244m_vs_dense"] = round(m["step_ms"] / d["step_ms"], 4)
        g["memory_ratio_moeut_244m_vs_dense"] = round(m["peak_memory_mb"] / max(d["peak_memory_mb"], 1e-9), 4)
    else:
        for k in ("step_ratio_moeut_244m_vs_dense", "memory_ratio_moeut_244m_vs_dense"):
            missing[k] = "model_step has no moeut-244m and dense-244m rows"
    if "moeut-244m" in res and "reference-moeut-244m" in res:
        g["step_speedup_vs_reference_model_244m"] = round(
            res["reference-moeut-244m"]["step_ms"] / res["moeut-244m"]["step_ms"], 4)
    else:
        missing["step_speedup_vs_reference_model_244m"] = "model_step has no row of the authors' MoEUTLM"
    return g, missing


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--dry-run", action="store_true", help="mark the file as a CPU dry run (no GPU numbers)")
    args = ap.parse_args(argv)
    steps = {name: _load(args.out_dir / f"{name}.json") for name in STEPS}
    versions = _load(args.out_dir / "versions.json") or {}
    g, missing = goals(steps)
    doc = {"dry_run": args.dry_run, "device": versions.get("device"), "torch": versions.get("torch"),
           "triton": versions.get("triton"), "tests": _load(args.out_dir / "tests.json"),
           "rows": {name: (d or {}).get("results", d) for name, d in steps.items()},
           "pairs": (steps.get("model_step") or {}).get("pairs"), "goals": g, "goals_missing": missing}
    args.dest.parent.mkdir(parents=True, exist_ok=True)
    args.dest.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({"goals": g, "goals_missing": missing}, indent=1))


if __name__ == "__main__":
    main()
