"""σ-MoE feed-forward and SwitchHead projections vs dense layers, forward+backward, per backend.

Prints one JSON object to stdout; ``results`` holds one object per (layer, shape, backend) with at least
``layer, d_model, n_experts, expert_size, k, backend, ms, dense_active_ms, ratio_active`` (and
``dense_params_ms, ratio_params``). Run ``python benchmarks/moe_layer.py`` (CPU shapes, N = 4096),
``--device cuda --dtype bfloat16`` (the 244M shapes, N = 32768), or ``--quick`` (< 1 minute on 2 cores).
The layers are built here from the op alone:

    σ-MoE:      s = σ(x W_selᵀ); gates, ids = top-K(s); h = ReLU(x W_up[ids]); y = Σ_k gates_k · h_k W_down[ids_k]
    SwitchHead: per head, gates/ids = top-K_A(σ(x W_Sᵀ)) for V and O; v_h = Σ gates · x W_V[ids];
                y = Σ_h Σ gates · a_h W_O[ids]   (a = v: the attention softmax, equal for both, is left out)

Baselines: dense layers with the same *active* FLOPs (MLP d_ff = K·d_expert; V/O projections of width
K_A·H·d_h) and with the same *parameter count* (d_ff = E·d_expert; width N_A·H·d_h). Ratios are expert
layer time / dense time (lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from moeut.ops import available_backends, default_backend, expert_matmul, sigma_moe_experts  # noqa: E402
from moeut.runtime import tune_malloc  # noqa: E402

MALLOC_TUNED = tune_malloc()  # before the benchmark allocates anything
from moeut.ops import current_policy, use_policy  # noqa: E402
from moeut.ops.grouped_mm_layout import GROUPED_MM_EXISTS  # noqa: E402
from moeut.ops.plan import make_plan  # noqa: E402


# ------------------------------------------------------------------------------------------- layers
def sigma_moe(x, w_sel, w_up, w_down, k, backend):
    """σ-MoE FFN (Csordás et al. 2023, Eq. 5-9 without the regulariser), built from expert_matmul."""
    scores = torch.sigmoid(x @ w_sel.t())  # [N, E]
    gates, ids = scores.topk(k, dim=1, sorted=False)
    plan = make_plan(ids, w_up.shape[0]) if backend != "reference" else None  # one sort, two matmuls
    return sigma_moe_experts(x, ids, gates, w_up, w_down, backend=backend, plan=plan)  # [N, d], as the model


def switchhead_projections(x, sel_v, sel_o, w_v, w_o, n_heads, k, backend):
    """SwitchHead's expert V and O projections (MoEUT Sec. 2.2) with per-head sigmoid top-k routers."""
    n, n_exp = x.shape[0], w_v.shape[0] // n_heads
    offset = torch.arange(n_heads, device=x.device).unsqueeze(-1) * n_exp

    def route(sel):
        gates, ids = torch.sigmoid(x @ sel.t()).view(n, n_heads, n_exp).topk(k, dim=-1, sorted=False)
        return gates.reshape(n, -1), (ids + offset).reshape(n, -1)

    gates_v, ids_v = route(sel_v)
    gates_o, ids_o = route(sel_o)
    v = expert_matmul(x, ids_v, w_v, gates_v, out_groups=n_heads, backend=backend)  # [N, H, d_h]
    return expert_matmul(v, ids_o, w_o, gates_o, backend=backend).squeeze(1)  # [N, d]


def dense_mlp(x, w1, w2):
    return torch.relu(x @ w1) @ w2


def dense_projections(x, w_v, w_o):
    return (x @ w_v) @ w_o


# ------------------------------------------------------------------------------------------ timing
def log(msg):
    print(msg, file=sys.stderr, flush=True)  # progress; the JSON alone goes to stdout


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _cpu_ticks():
    """(busy, total) jiffies of the whole machine from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:9]]
    except OSError:
        return None
    return sum(v) - v[3] - v[4], sum(v)  # minus idle and iowait


def _foreign_cpu_fraction(t0, t1, own_cpu_s):
    """Share of the machine's CPU time used by *other* processes between two _cpu_ticks() readings."""
    if t0 is None or t1 is None or t1[1] - t0[1] < 10:  # too short to tell at jiffy resolution
        return 0.0
    hz = os.sysconf("SC_CLK_TCK")
    return max(0.0, (t1[0] - t0[0]) / hz - own_cpu_s) / ((t1[1] - t0[1]) / hz)


def time_fwd_bwd(fn, params, x, grad, device, warmup, reps, max_foreign=0.1):
    """Median and min wall time (ms) of forward + backward (``fn().backward(grad)``: a dense output
    gradient as in training, not the broadcast one of ``.sum()``), after ``warmup`` untimed runs. ``x`` is
    redrawn before every run (untimed), so the experts' row counts change from run to run as in training
    (on a CPU in bf16 a GEMM shape not seen before costs a kernel build).

    On a shared machine a rep during which other processes used more than ``max_foreign`` of the CPUs
    is discarded and repeated (at most ``2·reps`` extra times): with one core taken, every OpenMP
    parallel region waits for the descheduled thread and small-op code slows down up to 50×.
    """
    def step():
        for p in params:
            p.grad = None
        x.grad = None
        fn().backward(grad)

    def new_input():  # as in training, the routing (each expert's row count) changes every step
        with torch.no_grad():
            x.normal_()

    for _ in range(warmup):
        new_input()
        step()
    sync(device)
    times, discarded = [], 0
    while len(times) < reps:
        new_input()
        sync(device)
        c0, k0 = time.process_time(), _cpu_ticks()
        t0 = time.perf_counter()
        step()
        sync(device)
        dt = (time.perf_counter() - t0) * 1e3
        foreign = _foreign_cpu_fraction(k0, _cpu_ticks(), time.process_time() - c0)
        if foreign > max_foreign and discarded < 2 * reps:
            discarded += 1
            continue
        times.append(dt)
    out = {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2), "reps": reps}
    if discarded:
        out["discarded_busy_reps"] = discarded
    return out


def _param_factory(device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def param(*shape, scale, grad=True):
        t = (torch.randn(*shape, generator=g) * scale).to(device, dtype)
        return t.requires_grad_() if grad else t

    return param


def _time_backends(records, base, fn_for_backend, params, x, grad, device, warmup, reps, backends, run_reference):
    for backend in backends:
        r, w = reps, warmup
        if backend == "reference":  # the oracle runs every expert on every row for every slot
            if not run_reference:
                continue
            r, w = 1, 0
        t = time_fwd_bwd(fn_for_backend(backend), params, x, grad, device, w, r)
        rec = {**base, "backend": backend, "ms": t["median_ms"], "min_ms": t["min_ms"], "reps": t["reps"]}
        if "discarded_busy_reps" in t:
            rec["discarded_busy_reps"] = t["discarded_busy_reps"]
        records.append(rec)
        log(f"  {base['layer']}/{backend}: {t}")


def _finish(records, first, active, params):
    for rec in records[first:]:
        rec.update(dense_active_ms=active["median_ms"], dense_params_ms=params["median_ms"],
                   ratio_active=round(rec["ms"] / active["median_ms"], 3),
                   ratio_params=round(rec["ms"] / params["median_ms"], 3))
    log(f"  dense: same active FLOPs {active['median_ms']} ms, same params {params['median_ms']} ms")


def bench_sigma_moe(records, d, n_experts, d_expert, k, n_tokens, device, dtype, warmup, reps, backends, run_ref):
    param = _param_factory(device, dtype)
    x = param(n_tokens, d, scale=1.0)
    grad = torch.randn(n_tokens, d).to(device, dtype)  # dL/dy: a dense gradient as in training
    w_sel = param(n_experts, d, scale=d**-0.5)
    w_up = param(n_experts, d, d_expert, scale=d**-0.5)
    w_down = param(n_experts, d_expert, d, scale=(k * d_expert) ** -0.5)
    base = {"layer": "sigma_moe", "d_model": d, "n_experts": n_experts, "expert_size": d_expert, "k": k,
            "n_tokens": n_tokens}
    first = len(records)
    _time_backends(records, base, lambda b: (lambda: sigma_moe(x, w_sel, w_up, w_down, k, b)),
                   [w_sel, w_up, w_down], x, grad, device, warmup, reps, backends, run_ref)
    w1, w2 = param(d, k * d_expert, scale=d**-0.5), param(k * d_expert, d, scale=(k * d_expert) ** -0.5)
    active = time_fwd_bwd(lambda: dense_mlp(x, w1, w2), [w1, w2], x, grad, device, warmup, reps)
    del w1, w2
    w1 = param(d, n_experts * d_expert, scale=d**-0.5)
    w2 = param(n_experts * d_expert, d, scale=(n_experts * d_expert) ** -0.5)
    params = time_fwd_bwd(lambda: dense_mlp(x, w1, w2), [w1, w2], x, grad, device, warmup, reps)
    _finish(records, first, active, params)


def bench_switchhead(records, d, n_heads, d_head, n_experts, k, n_tokens, device, dtype, warmup, reps, backends,
                     run_ref):
    param = _param_factory(device, dtype, seed=1)
    x = param(n_tokens, d, scale=1.0)
    grad = torch.randn(n_tokens, d).to(device, dtype)
    sel_v, sel_o = param(n_heads * n_experts, d, scale=d**-0.5), param(n_heads * n_experts, d, scale=d**-0.5)
    w_v = param(n_heads * n_experts, d, d_head, scale=d**-0.5)
    w_o = param(n_heads * n_experts, d_head, d, scale=(n_heads * d_head) ** -0.5)
    base = {"layer": "switchhead", "d_model": d, "n_heads": n_heads, "d_head": d_head, "n_experts": n_experts,
            "expert_size": d_head, "k": k, "n_tokens": n_tokens}
    first = len(records)
    _time_backends(records, base, lambda b: (lambda: switchhead_projections(x, sel_v, sel_o, w_v, w_o, n_heads, k, b)),
                   [sel_v, sel_o, w_v, w_o], x, grad, device, warmup, reps, backends, run_ref)
    widths = {"active": k * n_heads * d_head, "params": n_experts * n_heads * d_head}
    timed = {}
    for name, width in widths.items():
        wv, wo = param(d, width, scale=d**-0.5), param(width, d, scale=width**-0.5)
        timed[name] = time_fwd_bwd(lambda wv=wv, wo=wo: dense_projections(x, wv, wo), [wv, wo], x, grad, device,
                                   warmup, reps)
    _finish(records, first, timed["active"], timed["params"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, few reps")
    ap.add_argument("--tokens", type=int, default=0, help="N, tokens per batch (default 4096 on CPU, 32768 on CUDA)")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per measurement")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--backends", default=",".join(available_backends()),
                    help="comma-separated expert_matmul backends to time")
    ap.add_argument("--gemm", default=None, choices=["auto", "grouped_mm", "loop"],
                    help="force the torch backend's GEMM implementation")
    ap.add_argument("--reference-on", default="first", choices=["first", "all", "none"],
                    help="shapes on which to time the (slow) reference oracle")
    args = ap.parse_args(argv)

    with use_policy(gemm=args.gemm or current_policy().gemm):
        run_all(args)


def run_all(args: argparse.Namespace) -> None:
    """Time every shape and backend of the run (under the policy main set) and print the JSON."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    backends = [b for b in args.backends.split(",") if b]
    #             d_model, experts, d_expert, K                 d_model, H, d_h, N_A, K_A
    if args.quick:
        moe_shapes, att_shapes = [(64, 8, 32, 2)], [(64, 2, 16, 4, 2)]
        n_tokens, reps, warmup = min(args.tokens or 256, 256), 2, 1
    elif device.type == "cuda":  # moeut-244m and moeut-44m shapes, batch 32 x 1024 tokens
        moe_shapes = [(1024, 387, 128, 16), (412, 155, 128, 12)]
        att_shapes = [(1024, 4, 128, 10, 2), (412, 4, 82, 8, 2)]
        n_tokens, reps, warmup = args.tokens or 32768, args.reps, args.warmup
    else:
        moe_shapes = [(256, 64, 128, 8), (256, 128, 128, 4), (256, 64, 128, 16), (512, 128, 128, 8),
                      (512, 64, 128, 16)]
        att_shapes = [(256, 4, 64, 4, 2), (412, 4, 82, 8, 2)]
        n_tokens, reps, warmup = args.tokens or 4096, args.reps, args.warmup

    out = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "malloc_tuned": MALLOC_TUNED,
        "grouped_mm_available": GROUPED_MM_EXISTS,
        "torch_backend_gemm": current_policy().describe(device, dtype),
        "timing": "forward+backward wall time in ms; median (and min) over reps after warm-up",
        "results": [],
    }
    records = out["results"]
    for i, (d, e, de, k) in enumerate(moe_shapes):
        log(f"sigma-moe: d_model {d}, {e} experts x {de}, K {k}, N {n_tokens}")
        run_ref = args.reference_on == "all" or (args.reference_on == "first" and i == 0)
        bench_sigma_moe(records, d, e, de, k, n_tokens, device, dtype, warmup, reps, backends, run_ref)
    for d, h, dh, e, k in att_shapes:
        log(f"switchhead: d_model {d}, {h} heads x {e} experts of {dh}, K_A {k}, N {n_tokens}")
        bench_switchhead(records, d, h, dh, e, k, n_tokens, device, dtype, warmup, reps, backends,
                         args.reference_on == "all")
    fast = default_backend(device)
    for r in records:  # the CPU target: σ-MoE ≤ 1.2× the dense MLP of equal active FLOPs
        if r["layer"] == "sigma_moe" and r["backend"] == fast and \
                (r["d_model"], r["n_experts"], r["expert_size"], r["k"]) == (256, 64, 128, 8):
            out["target"] = {"shape": "sigma_moe d_model 256, 64 experts x 128, K 8", "backend": fast,
                             "ratio_active": r["ratio_active"], "goal": 1.2, "met": r["ratio_active"] <= 1.2}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
