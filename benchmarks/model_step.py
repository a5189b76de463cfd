"""Training-step time and peak memory: MoEUT vs its parameter-matched dense baseline.

One full step as ``moeut train`` runs it (forward, cross-entropy + regulariser, backward, gradient
clipping, AdamW), timed after warm-up; each preset runs in a fresh subprocess so its memory peak is its
own. Prints one JSON object; ``results`` has one object per preset and ``pairs`` the MoEUT/dense ratios.

    python benchmarks/model_step.py                       # CPU: moeut-tiny/-small vs dense-tiny/-small
    python benchmarks/model_step.py --device cuda         # GPU, bf16: moeut-44m/-244m vs dense-44m/-244m
    python benchmarks/model_step.py --quick               # smoke run

Memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed steps; on CPU the growth of the
process's peak resident set (``ru_maxrss``) from just before the first step (model and data allocated,
no optimizer state yet) to the end — activations, gradients and AdamW state, as the allocator saw them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_one(preset: str, device: str, batch: int, seq: int, warmup: int, reps: int, backend: str | None) -> dict:
    """Time one preset in this process (called in a fresh subprocess by :func:`main`)."""
    sys.path.insert(0, SRC)
    from moeut.runtime import tune_malloc

    tuned = tune_malloc()
    import torch

    from moeut.model import ModelConfig, build_model
    from moeut.model.accounting import model_stats
    from moeut.ops import default_backend

    dev = torch.device(device)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(preset)
    model = build_model(cfg, backend=backend).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=2.5e-4, weight_decay=0.01)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=dev)
    amp = dev.type == "cuda"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = model(tokens[:, :-1])
        loss = out.loss(tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(warmup):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    res = {"preset": preset, "arch": cfg.arch, "params": sum(p.numel() for p in model.parameters()),
           "batch": batch, "seq_len": seq, "tokens_per_step": batch * seq, "step_ms": round(ms, 2),
           "min_step_ms": round(min(times) * 1e3, 2), "tokens_per_s": round(batch * seq / ms * 1e3, 1),
           "reps": reps, "warmup": warmup, "malloc_tuned": tuned, "threads": torch.get_num_threads(),
           "expert_backend": (backend or default_backend(dev)) if cfg.arch != "dense" else None,
           "forward_macs_per_token": model_stats(cfg, seq).get("macs_per_token")}
    if dev.type == "cuda":
        res["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        res["device"] = torch.cuda.get_device_name(dev)
    else:
        res["peak_memory_mb"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1)
        res["device"] = platform.processor() or "cpu"
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pairs", default=None,
                    help="comma-separated moeut:dense preset pairs (default: tiny and small on CPU, 44m and "
                         "244m on CUDA)")
    ap.add_argument("--batch", type=int, default=0, help="sequences per step (default 16 on CPU, 32 on CUDA)")
    ap.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (default 256 CPU, 1024 CUDA)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backend", default=None, help="expert-matmul backend (default: automatic)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny presets, batch 2 x 32, 1 rep")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: time one preset, print JSON
    args = ap.parse_args(argv)

    cuda = args.device.startswith("cuda")
    batch = args.batch or (32 if cuda else 16)
    seq = args.seq_len or (1024 if cuda else 256)
    warmup, reps = args.warmup, args.reps
    pairs = args.pairs or ("moeut-44m:dense-44m,moeut-244m:dense-244m" if cuda else
                           "moeut-tiny:dense-tiny,moeut-small:dense-small")
    if args.quick:
        pairs, batch, seq, warmup, reps = "moeut-tiny:dense-tiny", 2, 32, 1, 1
    if args.one:
        print(json.dumps(run_one(args.one, args.device, batch, seq, warmup, reps, args.backend)))
        return

    out = {"device": args.device, "python": platform.python_version(),
           "timing": "median wall time of a full training step (fwd, loss, bwd, clip, AdamW) after warm-up",
           "dtype": "bf16 autocast" if cuda else "fp32", "results": [], "pairs": []}
    for pair in pairs.split(","):
        moe, dense = pair.split(":")
        got = {}
        for preset in (moe, dense):
            log(f"{preset}: batch {batch} x {seq} on {args.device}")
            cmd = [sys.executable, os.path.abspath(__file__), "--one", preset, "--device", args.device,
                   "--batch", str(batch), "--seq-len", str(seq), "--warmup", str(warmup), "--reps", str(reps)]
            if args.backend:
                cmd += ["--backend", args.backend]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                got[preset] = {"preset": preset, "error": proc.stderr.strip().splitlines()[-1:]}
            else:
                got[preset] = json.loads(proc.stdout.strip().splitlines()[-1])
            out["results"].append(got[preset])
            log(f"  {got[preset]}")
        a, b = got[moe], got[dense]
        if "step_ms" in a and "step_ms" in b:
            out["pairs"].append({"moeut": moe, "dense": dense, "step_time_ratio": round(a["step_ms"] / b["step_ms"], 3),
                                 "peak_memory_ratio": round(a["peak_memory_mb"] / max(b["peak_memory_mb"], 1e-9), 3)})
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
