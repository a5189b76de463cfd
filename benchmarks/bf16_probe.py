"""Why is the expert path slower in bf16 on a CPU with native bf16? A one-minute probe for such a CPU.

MoEUT's expert GEMMs have a different row count per expert and per step (how many tokens chose it); dense
GEMMs always have the same shape. oneDNN (which runs bf16 matmuls on CPUs with AVX512-BF16/AMX) builds and
caches a kernel per shape, so a GEMM whose shape keeps changing may pay for a new kernel on every call. This
probe times, in fp32 and bf16, the expert GEMM shapes of ``moeut-small`` four ways:

* ``fixed``: the same row count on every call (what a dense layer sees);
* ``varying``: another row count on every call, from a set that repeats (after the warm-up round its
  kernels are cached);
* ``unseen``: a row count never multiplied before in the process on every call (what the experts of a
  training run see: their counts keep changing);
* ``bucketed``: the varying counts rounded up to a multiple of ``--bucket`` rows (a few shapes, reused).

and the glue around the GEMMs (gather, weighted slot sum, gate multiply) in both dtypes. Prints one JSON
object. If ``unseen`` is much slower than ``fixed`` in bf16 only, building kernels for new shapes is the
problem (on an AMX Xeon, 2026-12-02: 20-40x) and few shapes are the fix (the torch backend's block layout);
if the glue rows are slow in bf16, the glue is.

    python benchmarks/bf16_probe.py             # about a minute on 2 cores
    python benchmarks/bf16_probe.py --quick     # smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from moeut.runtime import cpu_has_native_bf16, cpu_model, tune_malloc  # noqa: E402

MALLOC_TUNED = tune_malloc()
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _time(fn, calls: int, rounds: int) -> float:
    """Median over ``rounds`` of the mean time of ``calls`` calls, in ms (after one warm-up round)."""
    fn(calls)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(calls)
        times.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(times)


def _unseen_counts(rows: int, spread: int, n: int) -> list[int]:
    """``n`` distinct row counts outside ``fixed``'s (``rows``) and ``varying``'s (``rows ± spread/2``), taken
    alternately just below and just above that range, so their mean stays within one row of ``rows`` (comparable
    FLOPs)."""
    below = [rows - spread // 2 - 1 - j for j in range(n // 2)]
    above = [rows + spread // 2 + j for j in range(n - n // 2)]
    if below and below[-1] < 1:
        raise ValueError(f"{n} unseen row counts below {rows - spread // 2} would reach 0: use fewer calls or rounds")
    return [m for pair in itertools.zip_longest(above, below) for m in pair if m is not None]


def gemm_rows(dtype: torch.dtype, rows: int, k: int, n: int, wgrad: bool, calls: int, rounds: int,
              bucket: int, spread: int) -> dict:
    """One expert GEMM family: ``[m, k] @ [k, n]`` (or the weight gradient ``[k, m] @ [m, n]``)."""
    g = torch.Generator().manual_seed(0)
    unseen_rows = _unseen_counts(rows, spread, calls * (rounds + 1))
    big = max(rows + spread + bucket, max(unseen_rows) + 1)
    a = torch.randn(big, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    gy = torch.randn(big, n, generator=g).to(dtype)
    sizes = [rows - spread // 2 + (i * 7919) % spread for i in range(calls)]  # a new m on each call
    # row counts this process has not multiplied before (varying's repeat from round to round, so after
    # the warm-up round they hit oneDNN's kernel cache; an expert's count in training keeps changing)
    unseen = iter(unseen_rows)

    def run(ms):
        def go(c):
            for i in range(c):
                m = ms[i % len(ms)]
                if wgrad:
                    torch.mm(a[:m].t(), gy[:m])
                else:
                    torch.mm(a[:m], b)
        return go

    def run_unseen(c):
        for _ in range(c):
            m = next(unseen)
            if wgrad:
                torch.mm(a[:m].t(), gy[:m])
            else:
                torch.mm(a[:m], b)

    fixed = _time(run([rows]), calls, rounds)
    varying = _time(run(sizes), calls, rounds)
    new_shapes = _time(run_unseen, calls, rounds)
    bucketed = _time(run([-(-m // bucket) * bucket for m in sizes]), calls, rounds)
    flop = 2 * rows * k * n
    return {"dtype": str(dtype).removeprefix("torch."), "op": "wgrad" if wgrad else "mm", "rows": rows, "k": k,
            "n": n, "fixed_ms": round(fixed, 4), "varying_ms": round(varying, 4), "unseen_ms": round(new_shapes, 4),
            "bucketed_ms": round(bucketed, 4), "fixed_gflops": round(flop / fixed / 1e6, 1),
            "varying_over_fixed": round(varying / fixed, 3), "unseen_over_fixed": round(new_shapes / fixed, 3),
            "bucketed_over_fixed": round(bucketed / fixed, 3)}


def glue(dtype: torch.dtype, m: int, d: int, slots: int, calls: int, rounds: int) -> dict:
    """The permutation passes of one expert matmul at ``[M, d]``: gather rows, weighted slot sum, gate multiply."""
    g = torch.Generator().manual_seed(1)
    n = m // slots
    x = torch.randn(n, d, generator=g).to(dtype)
    y = torch.randn(m, d, generator=g).to(dtype)
    rows = torch.randint(0, n, (m,), generator=g)
    bags = torch.randperm(m, generator=g).view(n, slots)
    w = torch.rand(n, slots, generator=g).to(dtype)
    c = torch.rand(m, 1, generator=g).to(dtype)

    def rep(f):
        def go(k):
            for _ in range(k):
                f()
        return go

    return {"dtype": str(dtype).removeprefix("torch."), "rows": m, "width": d, "slots": slots,
            "gather_ms": round(_time(rep(lambda: x.index_select(0, rows)), calls, rounds), 3),
            "slot_sum_ms": round(_time(rep(lambda: F.embedding_bag(bags, y, mode="sum", per_sample_weights=w)),
                                       calls, rounds), 3),
            "gate_mul_ms": round(_time(rep(lambda: y * c), calls, rounds), 3)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small shapes, few calls")
    ap.add_argument("--bucket", type=int, default=64, help="row multiple of the bucketed runs")
    ap.add_argument("--calls", type=int, default=64, help="GEMM calls per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    calls, rounds = (8, 1) if args.quick else (args.calls, args.rounds)
    # moeut-small: σ-MoE 32 experts × 128 (d 256, K 4, 16k slots → ~512 rows each), SwitchHead 16 experts × 64
    rows_moe, rows_att, spread = (64, 128, 32) if args.quick else (512, 2048, 128)
    families = [(rows_moe, 256, 128, False), (rows_moe, 128, 256, False), (rows_moe, 256, 128, True),
                (rows_att, 256, 64, False), (rows_att, 64, 256, False), (rows_att, 64, 256, True)]
    dtypes = [torch.float32, torch.bfloat16]
    gemms = [gemm_rows(dt, r, k, n, wg, calls, rounds, args.bucket, spread) for dt in dtypes for r, k, n, wg in families]
    m = 2048 if args.quick else 32768
    glues = [glue(dt, m, 256, 8, max(2, calls // 8), rounds) for dt in dtypes]
    bf16 = [r for r in gemms if r["dtype"] == "bfloat16"]
    print(json.dumps({
        "cpu": cpu_model(), "native_bf16": cpu_has_native_bf16(), "torch": torch.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(), "malloc_tuned": MALLOC_TUNED,
        "bucket": args.bucket, "gemm": gemms, "glue": glues,
        "summary": {"bf16_varying_over_fixed_median": statistics.median(r["varying_over_fixed"] for r in bf16),
                    "bf16_unseen_over_fixed_median": statistics.median(r["unseen_over_fixed"] for r in bf16),
                    "bf16_bucketed_over_fixed_median": statistics.median(r["bucketed_over_fixed"] for r in bf16)},
    }, indent=2))


if __name__ == "__main__":
    main()
