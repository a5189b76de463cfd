#!/usr/bin/env bash
# One GPU check in under 8 minutes (issue 5): kernel correctness vs the reference (the gpu-marked tests,
# including 244M shapes), CVMM TFLOP/s vs a cuBLAS bf16 matmul of equal FLOPs, and the 44M/244M training
# step time and peak memory of MoEUT vs dense. Writes JSON files into ${OUT:-gpu_check_out}/.
#
#   bash benchmarks/gpu_check.sh                # from the repository root, with moeut and triton installed
#   PYTHONPATH=$PWD/src:$PWD bash benchmarks/gpu_check.sh   # from a bare checkout
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:-$PWD/src:$PWD}
status=0
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/versions.txt" || status=1

echo "== 1. correctness: gpu-marked tests (ops, Triton, compile, model) =="
timeout 240 "$PY" -m pytest -q -x -m gpu tests/ops tests/model -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 2. CVMM throughput vs cuBLAS (bf16, 244M shapes) =="
timeout 120 "$PY" benchmarks/cvmm_tflops.py --device cuda --dtype bfloat16 > "$OUT/cvmm_tflops.json" || status=1
timeout 60 "$PY" benchmarks/cvmm_tflops.py --device cuda --dtype bfloat16 --backend torch --reps 5 \
  > "$OUT/cvmm_tflops_torch_backend.json" || status=1

echo "== 3. layers and training steps: MoEUT vs dense (bf16) =="
timeout 90 "$PY" benchmarks/moe_layer.py --device cuda --dtype bfloat16 --reps 5 --reference-on none \
  > "$OUT/moe_layer.json" || status=1
timeout 150 "$PY" benchmarks/model_step.py --device cuda --reps 5 > "$OUT/model_step.json" || status=1

"$PY" - "$OUT" <<'EOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
summary = {}
for name in ("cvmm_tflops", "cvmm_tflops_torch_backend", "moe_layer", "model_step"):
    p = out / f"{name}.json"
    if p.exists() and p.stat().st_size:
        d = json.loads(p.read_text())
        if name.startswith("cvmm"):
            summary[name] = {r["projection"]: [r["fwd_ratio_to_dense"], r["fwd_bwd_ratio_to_dense"]] for r in d["results"]}
        elif name == "moe_layer":
            summary[name] = [(r["layer"], r["d_model"], r["backend"], r["ratio_active"]) for r in d["results"]]
        else:
            summary[name] = d["pairs"]
print(json.dumps(summary, indent=1))
(out / "summary.json").write_text(json.dumps(summary, indent=1))
EOF
exit $status
