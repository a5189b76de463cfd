"""Training-step time and peak memory: MoEUT vs its parameter-matched dense baseline, in fp32 and/or bf16.

One full step as ``moeut train`` runs it (:func:`moeut.train.train_step`: forward, cross-entropy + regulariser,
backward, gradient clipping, AdamW) on a new random batch each step, timed after warm-up; each preset and precision runs in a fresh subprocess
so its memory peak is its own. ``--rounds N`` repeats the whole set N times, interleaved (A B A B …, so a
busy moment hits every configuration alike) and reports the median over rounds. Prints one JSON object:
``results`` has one object per (preset, precision), ``pairs`` the MoEUT/dense ratio per precision and
``bf16_speedup`` each preset's fp32/bf16 step-time ratio (with ``--precision both``).

    python benchmarks/model_step.py                         # CPU, fp32: moeut-tiny/-small vs dense-tiny/-small
    python benchmarks/model_step.py --precision both --rounds 3   # fp32 and bf16 autocast, interleaved
    python benchmarks/model_step.py --device cuda           # GPU, bf16: moeut-44m/-244m vs dense-44m/-244m
    python benchmarks/model_step.py --quick                 # smoke run

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
sys.path.insert(0, SRC)

from moeut.runtime import cpu_has_native_bf16, cpu_model, tune_malloc  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_one(preset: str, device: str, batch: int, seq: int, warmup: int, reps: int, backend: str | None,
            precision: str) -> dict:
    """Time one preset at one precision in this process (called in a fresh subprocess by :func:`main`)."""
    tuned = tune_malloc()
    import torch

    from moeut.model import ModelConfig, build_model
    from moeut.model.accounting import model_stats
    from moeut.ops import default_backend
    from moeut.train import autocast_for, train_step

    dev = torch.device(device)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(preset)
    model = build_model(cfg, backend=backend).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=2.5e-4, weight_decay=0.01)
    # a new batch every step, as in training: the experts' row counts change from step to step (on a
    # CPU in bf16, a GEMM shape not seen before costs a kernel build, see ops/policy.py, the block layout)
    batches = iter(torch.randint(0, cfg.vocab_size, (warmup + reps, batch, seq + 1), device=dev))

    def step() -> None:  # ends in .item(): the device has finished
        train_step(model, opt, next(batches), grad_clip=0.25, autocast=autocast_for(precision, dev))

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    res = {"preset": preset, "arch": cfg.arch, "precision": precision,
           "params": sum(p.numel() for p in model.parameters()),
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
        res["device"] = cpu_model()
        res["native_bf16"] = cpu_has_native_bf16()
    return res


def _median_row(rows: list[dict]) -> dict:
    """One (preset, precision) over the rounds: the round with the median step time, plus every round's."""
    ok = sorted((r for r in rows if "step_ms" in r), key=lambda r: r["step_ms"])
    if not ok:
        return rows[-1]
    row = dict(ok[(len(ok) - 1) // 2])
    row["step_ms"] = round(statistics.median(r["step_ms"] for r in ok), 2)
    row["tokens_per_s"] = round(row["tokens_per_step"] / row["step_ms"] * 1e3, 1)
    row["round_step_ms"] = [r["step_ms"] for r in rows if "step_ms" in r]
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pairs", default=None,
                    help="comma-separated moeut:dense preset pairs (default: tiny and small on CPU, 44m and "
                         "244m on CUDA)")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16", "both"), default="auto",
                    help="fp32, bf16 (autocast), both (each preset in each, and its bf16 speed-up), or auto "
                         "(default: bf16 on CUDA, fp32 on CPU, as `moeut train --precision auto`)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every configuration this many times, interleaved; report the median")
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
    precisions = {"auto": ["bf16" if cuda else "fp32"], "both": ["fp32", "bf16"]}.get(args.precision,
                                                                                        [args.precision])
    if args.one:
        print(json.dumps(run_one(args.one, args.device, batch, seq, warmup, reps, args.backend, precisions[0])))
        return

    pair_list = [tuple(p.split(":")) for p in pairs.split(",")]
    presets = [p for pair in pair_list for p in pair]
    runs: dict[tuple[str, str], list[dict]] = {(p, q): [] for p in presets for q in precisions}
    for rnd in range(max(1, args.rounds)):
        for preset in presets:
            for prec in precisions:
                log(f"[round {rnd + 1}/{args.rounds}] {preset} {prec}: batch {batch} x {seq} on {args.device}")
                cmd = [sys.executable, os.path.abspath(__file__), "--one", preset, "--device", args.device,
                       "--batch", str(batch), "--seq-len", str(seq), "--warmup", str(warmup), "--reps", str(reps),
                       "--precision", prec]
                if args.backend:
                    cmd += ["--backend", args.backend]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    row = {"preset": preset, "precision": prec, "error": proc.stderr.strip().splitlines()[-1:]}
                else:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                runs[(preset, prec)].append(row)
                log(f"  {row.get('step_ms', row.get('error'))} ms")

    got = {k: _median_row(v) for k, v in runs.items()}
    out = {"device": args.device, "cpu": None if cuda else cpu_model(), "python": platform.python_version(),
           "timing": "median wall time of a full training step (fwd, loss, bwd, clip, AdamW) after warm-up"
                     + (f", median over {args.rounds} interleaved rounds" if args.rounds > 1 else ""),
           "precisions": precisions, "dtype": " and ".join("bf16 autocast" if q == "bf16" else q for q in precisions),
           "results": list(got.values()), "pairs": [], "bf16_speedup": []}
    for moe, dense in pair_list:
        for prec in precisions:
            a, b = got[(moe, prec)], got[(dense, prec)]
            if "step_ms" in a and "step_ms" in b:
                out["pairs"].append({"moeut": moe, "dense": dense, "precision": prec, "moeut_step_ms": a["step_ms"],
                                     "dense_step_ms": b["step_ms"],
                                     "step_time_ratio": round(a["step_ms"] / b["step_ms"], 3),
                                     "peak_memory_ratio": round(a["peak_memory_mb"] / max(b["peak_memory_mb"], 1e-9),
                                                                3)})
    if len(precisions) == 2:
        for preset in presets:
            a, b = got[(preset, "fp32")], got[(preset, "bf16")]
            if "step_ms" in a and "step_ms" in b:
                out["bf16_speedup"].append({"preset": preset, "fp32_step_ms": a["step_ms"],
                                            "bf16_step_ms": b["step_ms"],
                                            "speedup": round(a["step_ms"] / b["step_ms"], 3)})
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
