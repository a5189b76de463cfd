"""Expert-matmul (CVMM) throughput vs one dense matmul of the same FLOPs.

For each projection of a layer (σ-MoE up/down, SwitchHead V/O) at the 244M shapes, times the op's
forward and its backward (input + weight gradients) with a precomputed plan (the sort is shared and
timed separately), and a dense ``[M, d_in] @ [d_in, d_out]`` with M = tokens·slots (the same FLOPs) and
its backward. Prints JSON: TFLOP/s of both and their ratio (the issue's GPU target: ≥ 0.6 in bf16).

    python benchmarks/cvmm_tflops.py --device cuda --dtype bfloat16     # triton (default on CUDA)
    python benchmarks/cvmm_tflops.py --device cpu --quick --backend torch
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from moeut.ops import default_backend, expert_matmul, make_plan  # noqa: E402


def timeit(fn, device, warmup, reps) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(name, n, g_in, s, g_out, d_in, d_out, n_experts, gated, device, dtype, backend, warmup, reps):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, g_in, d_in, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(n_experts, d_in, d_out, generator=g) / d_in ** 0.5).to(device, dtype).requires_grad_()
    ids = torch.randint(0, n_experts, (n, s), generator=g).to(device)
    gates = torch.rand(n, s, generator=g).to(device, dtype).requires_grad_() if gated else None
    grad = torch.randn(n, g_out, d_out, generator=g).to(device, dtype)
    plan = make_plan(ids, n_experts)
    m = n * s
    flops = 2 * m * d_in * d_out

    def fwd():
        with torch.no_grad():
            expert_matmul(x, ids, w, gates, out_groups=g_out, backend=backend, plan=plan)

    def fwd_bwd():
        y = expert_matmul(x, ids, w, gates, out_groups=g_out, backend=backend, plan=plan)
        torch.autograd.grad(y, [x, w] + ([gates] if gated else []), grad)

    a = torch.randn(m, d_in, generator=g).to(device, dtype).requires_grad_()
    b = (torch.randn(d_in, d_out, generator=g) / d_in ** 0.5).to(device, dtype).requires_grad_()
    gd = torch.randn(m, d_out, generator=g).to(device, dtype)

    def dense_fwd():
        with torch.no_grad():
            a @ b

    def dense_fwd_bwd():
        torch.autograd.grad(a @ b, [a, b], gd)

    t = {"fwd": timeit(fwd, device, warmup, reps), "fwd_bwd": timeit(fwd_bwd, device, warmup, reps),
         "dense_fwd": timeit(dense_fwd, device, warmup, reps),
         "dense_fwd_bwd": timeit(dense_fwd_bwd, device, warmup, reps),
         "sort": timeit(lambda: make_plan(ids, n_experts), device, warmup, reps)}
    tf = lambda f, sec: round(f / sec / 1e12, 2)  # noqa: E731
    return {"projection": name, "tokens": n, "slots": s, "d_in": d_in, "d_out": d_out, "n_experts": n_experts,
            "backend": backend, "fwd_ms": round(t["fwd"] * 1e3, 3), "fwd_bwd_ms": round(t["fwd_bwd"] * 1e3, 3),
            "sort_ms": round(t["sort"] * 1e3, 3),
            "fwd_tflops": tf(flops, t["fwd"]), "dense_fwd_tflops": tf(flops, t["dense_fwd"]),
            "fwd_bwd_tflops": tf(3 * flops, t["fwd_bwd"]), "dense_fwd_bwd_tflops": tf(3 * flops, t["dense_fwd_bwd"]),
            "fwd_ratio_to_dense": round(t["dense_fwd"] / t["fwd"], 3),
            "fwd_bwd_ratio_to_dense": round(t["dense_fwd_bwd"] / t["fwd_bwd"], 3)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--backend", default=None)
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per batch (default 32 x 1024)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    backend = args.backend or default_backend(device)
    n = args.tokens
    # moeut-244m: σ-MoE d 1024, 387 experts x 128, K 16; SwitchHead 4 heads x 10 experts, d_h 128, K_A 2
    shapes = [("sigma_moe_up", n, 1, 16, 16, 1024, 128, 387, False),
              ("sigma_moe_down", n, 16, 16, 1, 128, 1024, 387, True),
              ("switchhead_v", n, 1, 8, 4, 1024, 128, 40, True),
              ("switchhead_o", n, 4, 8, 1, 128, 1024, 40, True)]
    warmup, reps = args.warmup, args.reps
    if args.quick:
        shapes = [(nm, 64, gi, s, go, max(16, di // 16), max(16, do // 16), min(e, 12), gt)
                  for nm, _, gi, s, go, di, do, e, gt in shapes]
        warmup, reps = 1, 2
    out = {"device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
           "dtype": args.dtype, "backend": backend, "torch": torch.__version__, "results": []}
    for shape in shapes:
        r = bench(*shape, device=device, dtype=dtype, backend=backend, warmup=warmup, reps=reps)
        print(json.dumps(r), file=sys.stderr, flush=True)
        out["results"].append(r)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
