#!/usr/bin/env bash
# One GPU check in under 8 minutes (issue 14): environment, the gpu-marked tests with autotuning off,
# expert-matmul (CVMM) throughput vs cuBLAS, layer and training-step time/memory of MoEUT vs dense.
# Step outputs go to ${OUT:-gpu_check_out}/; the summary to benchmarks/results/gpu.json (gpu_json.py).
#
#   bash benchmarks/gpu_check.sh             # on a CUDA machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run   # on CPU: every script's argument parsing, the --quick CPU runs
#                                            # and the JSON assembly (into $OUT/gpu.json, never results/)
# (MOEUT_GPU_CHECK_DRY_RUN=1 is the same as --dry-run.)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${MOEUT_GPU_CHECK_DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:-$PWD/src:$PWD} PYTHONUNBUFFERED=1
# first compile must fit (notes §5 P0): fixed configs for tests, pruned tuning with an on-disk cache for timings
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton_cache} TRITON_CACHE_AUTOTUNING=1 TRITON_PRINT_AUTOTUNING=1
status=0
step() { echo "== $* =="; }

step "0. environment"
"$PY" - "$OUT/versions.json" <<'EOF' || status=1
import json, sys, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
json.dump({"device": dev, "torch": torch.__version__, "triton": tv}, open(sys.argv[1], "w"))
print(dev, "torch", torch.__version__, "triton", tv)
EOF

if [ "$DRY" = 1 ]; then
  step "dry run: argument parsing of every script"
  for s in cvmm_tflops moe_layer model_step gpu_json; do
    "$PY" benchmarks/$s.py --help > /dev/null || { echo "FAILED: $s.py --help"; status=1; }
  done
  step "dry run: CPU --quick runs (no GPU numbers)"
  timeout 120 "$PY" benchmarks/cvmm_tflops.py --device cpu --quick --backend torch --dtype float32 \
    > "$OUT/cvmm_tflops.json" || status=1
  timeout 120 "$PY" benchmarks/model_step.py --quick > "$OUT/model_step.json" || status=1
  echo '{"skipped": "dry run: no CUDA tests"}' > "$OUT/tests.json"
  "$PY" benchmarks/gpu_json.py "$OUT" "$OUT/gpu.json" --dry-run || status=1
  exit $status
fi

step "1. correctness: gpu-marked tests and the Triton file, autotuning off"
MOEUT_TRITON_AUTOTUNE=off timeout 150 "$PY" -m pytest -q -x -m gpu tests/ops tests/model tests/integrations/test_hf_export_experts.py \
  -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/tests.txt"
rc=${PIPESTATUS[0]}
"$PY" -c "import json,sys; json.dump({'rc': int(sys.argv[1]), 'tail': open(sys.argv[2]).read()}, open(sys.argv[3], 'w'))" \
  "$rc" "$OUT/tests.txt" "$OUT/tests.json"
[ "$rc" -eq 0 ] || status=1

step "2. CVMM throughput vs cuBLAS (bf16, 244M shapes)"
MOEUT_TRITON_AUTOTUNE=pruned timeout 120 "$PY" benchmarks/cvmm_tflops.py --device cuda --dtype bfloat16 \
  > "$OUT/cvmm_tflops.json" || status=1
timeout 60 "$PY" benchmarks/cvmm_tflops.py --device cuda --dtype bfloat16 --backend torch --reps 5 \
  > "$OUT/cvmm_tflops_torch_backend.json" || status=1

step "3. layers and training steps: MoEUT vs dense (bf16)"
MOEUT_TRITON_AUTOTUNE=pruned timeout 60 "$PY" benchmarks/moe_layer.py --device cuda --dtype bfloat16 --reps 5 \
  --reference-on none > "$OUT/moe_layer.json" || status=1
MOEUT_TRITON_AUTOTUNE=pruned timeout 150 "$PY" benchmarks/model_step.py --device cuda --reps 5 \
  > "$OUT/model_step.json" || status=1

step "4. gpu.json"
"$PY" benchmarks/gpu_json.py "$OUT" benchmarks/results/gpu.json || status=1
du -sm "$TRITON_CACHE_DIR" 2>/dev/null | awk '$1 < 16 {exit 0} {exit 1}' && tar czf "$OUT/triton_cache.tgz" -C "$(dirname "$TRITON_CACHE_DIR")" "$(basename "$TRITON_CACHE_DIR")"
exit $status
