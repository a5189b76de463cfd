"""Where a training step's CPU time goes: ``torch.profiler`` per-op self time of full training steps.

One step as ``moeut train`` runs it (:func:`moeut.train.train_step`), profiled after warm-up; prints one JSON
object with the top operators by self CPU time (their share of the profiled time, calls, and the time of the
``moeut::*`` custom ops, which contain the expert GEMMs and the gather/scatter around them).

    python benchmarks/profile_step.py --preset moeut-small --precision bf16
    python benchmarks/profile_step.py --preset dense-small --top 15
"""

from __future__ import annotations

import argparse
import json
import os
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="moeut-tiny")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="profiled steps")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--backend", default=None)
    args = ap.parse_args(argv)

    sys.path.insert(0, SRC)
    from moeut.runtime import tune_malloc

    tune_malloc()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from moeut.model import ModelConfig, build_model
    from moeut.train import autocast_for, train_step

    torch.manual_seed(0)
    cfg = ModelConfig.from_name(args.preset)
    model = build_model(cfg, backend=args.backend)
    opt = torch.optim.AdamW(model.parameters(), lr=2.5e-4, weight_decay=0.01)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1))
    dev = torch.device("cpu")

    def step() -> None:
        train_step(model, opt, tokens, grad_clip=0.25, autocast=autocast_for(args.precision, dev))

    for _ in range(args.warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
    custom = [e for e in events if e.key.startswith("moeut::")]
    print(json.dumps({
        "preset": args.preset, "precision": args.precision, "tokens_per_step": args.batch * args.seq_len,
        "threads": torch.get_num_threads(), "profiled_steps": args.steps,
        "self_cpu_ms_per_step": round(total / 1e3 / args.steps, 2),
        "top_ops": [{"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / args.steps, 2),
                     "share": round(e.self_cpu_time_total / total, 4), "calls_per_step": e.count // args.steps}
                    for e in top],
        "moeut_custom_ops": [{"op": e.key, "total_ms_per_step": round(e.cpu_time_total / 1e3 / args.steps, 2),
                              "calls_per_step": e.count // args.steps} for e in custom],
    }, indent=2))


if __name__ == "__main__":
    main()
