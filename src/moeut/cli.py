"""``moeut`` command line: one verb per thing a user does.

    moeut info   [--preset NAME] [--context T] [--json]     parameters and compute of a preset
    moeut demo   [--preset NAME] [--steps N] [--backend B]  build a model and train it briefly
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence


def _cmd_info(args: argparse.Namespace) -> int:
    from moeut.model import PRESETS, ModelConfig
    from moeut.model.accounting import model_stats

    names = [args.preset] if args.preset else list(PRESETS)
    stats = {}
    for name in names:
        stats[name] = model_stats(ModelConfig.from_name(name), context=args.context)
    if args.json:
        print(json.dumps(stats[names[0]] if args.preset else stats, indent=2))
        return 0
    header = f"{'preset':<13}{'params':>10}{'non-emb':>10}{'active/tok':>12}{'MACs/tok':>11}  context"
    print(header)
    print("-" * len(header))
    for name, s in stats.items():
        print(f"{name:<13}{_m(s['params_total']):>10}{_m(s['params_non_embedding']):>10}"
              f"{_m(s['active_params_per_token']):>12}{_m(s['macs_per_token']):>11}  {s['macs_context']}")
    if args.preset:
        print("\nconfig: " + json.dumps(stats[args.preset]["config"]))
    return 0


def _m(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _cmd_demo(args: argparse.Namespace) -> int:
    """Until the data pipeline lands: build the model, train it on a synthetic copy task, show it learns."""
    import torch

    from moeut.model import ModelConfig, MoEUTLM
    from moeut.model.accounting import model_stats
    from moeut.ops import default_backend
    from moeut.runtime import tune_malloc

    tune_malloc()
    torch.manual_seed(args.seed)
    cfg = ModelConfig.from_name(args.preset, vocab_size=args.vocab, context_length=args.context)
    model = MoEUTLM(cfg, backend=args.backend)
    s = model_stats(cfg)
    backend = args.backend or default_backend(torch.device("cpu"))
    print(f"{args.preset}: {_m(s['params_total'])} parameters ({_m(s['params_non_embedding'])} non-embedding), "
          f"{cfg.n_layers} layer applications of {cfg.group_size} distinct layers, expert backend {backend!r}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    # synthetic task: the second half of each sequence repeats the first half
    half = args.context // 2
    t0, first = time.perf_counter(), None
    for step in range(1, args.steps + 1):
        x = torch.randint(0, cfg.vocab_size, (args.batch, half))
        seq = torch.cat([x, x], dim=1)
        out = model(seq[:, :-1])
        ce = torch.nn.functional.cross_entropy(out.logits[:, half - 1:].flatten(0, 1), seq[:, half:].flatten())
        loss = ce + out.reg_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()
        first = first if first is not None else ce.item()
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            tok_s = step * args.batch * (args.context - 1) / (time.perf_counter() - t0)
            print(f"step {step:4d}  copy-task loss {ce.item():.3f}  reg {out.reg_loss.item():+.4f}  {tok_s:,.0f} tok/s")
    final = ce.item()
    print(f"loss on the copied half: {first:.3f} -> {final:.3f} (chance: {torch.log(torch.tensor(float(cfg.vocab_size))):.3f})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeut", description="MoEUT: Mixture-of-Experts Universal Transformers")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter counts, active parameters and MACs per token of a preset")
    info.add_argument("--preset", help="preset name (default: every preset as a table)")
    info.add_argument("--context", type=int, default=None, help="context length for the MAC count "
                      "(default: the preset's, 1024 for the paper presets)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=_cmd_info)

    demo = sub.add_parser("demo", help="build a small model and train it briefly on a synthetic copy task")
    demo.add_argument("--preset", default="moeut-tiny")
    demo.add_argument("--steps", type=int, default=100)
    demo.add_argument("--batch", type=int, default=16)
    demo.add_argument("--context", type=int, default=64)
    demo.add_argument("--vocab", type=int, default=64, help="vocabulary of the synthetic task")
    demo.add_argument("--lr", type=float, default=2e-3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--backend", default=None, help="expert-matmul backend (default: automatic)")
    demo.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # ConfigError is a ValueError: show the message, no traceback
        print(f"moeut {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
