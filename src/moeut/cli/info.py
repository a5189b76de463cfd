"""``moeut info``: parameters, active parameters and MACs per token of the presets."""

from __future__ import annotations

import argparse
import json

from moeut.model import PRESETS, ModelConfig
from moeut.model.accounting import model_stats

HELP = "parameter counts, active parameters and MACs per token of a preset"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="preset name (default: every preset as a table)")
    p.add_argument("--context", type=int, default=None, help="context length for the MAC count "
                   "(default: the preset's, 1024 for the paper presets)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    names = [args.preset] if args.preset else list(PRESETS)
    stats = {name: model_stats(ModelConfig.from_name(name), context=args.context) for name in names}
    if args.json:
        print(json.dumps(stats[names[0]] if args.preset else stats, indent=2))
        return 0
    w = max(13, *(len(n) + 1 for n in stats))
    header = (f"{'preset':<{w}}{'params':>10}{'non-emb':>10}{'active/tok':>12}{'paper MACs/tok':>16}"
              f"{'moeut MACs/tok':>16}  context")
    print(header)
    print("-" * len(header))
    for name, s in stats.items():
        paper = "-" if s["paper_macs_per_token"] is None else _m(s["paper_macs_per_token"])
        print(f"{name:<{w}}{_m(s['params_total']):>10}{_m(s['params_non_embedding']):>10}"
              f"{_m(s['active_params_per_token']):>12}{paper:>16}{_m(s['macs_per_token']):>16}  {s['macs_context']}")
    print("\npaper MACs/tok: the authors' accounting (paper/moe_universal/common.py of moeut_training_code: forward,"
          "\n  layers only, one router per layer; no formula for SUT). moeut MACs/tok: moeut's own count of every"
          "\n  matmul of a token's forward pass (per-head routers, gate mixing, output head).")
    if any(s["config"].get("act") for s in stats.values()):
        print("ACT presets are counted at their maximum depth; with act_halting=\"skip\" halted tokens skip their"
              "\n  work, so a run's MACs/tok are those of the depth its tokens ran (training logs"
              "\n  act/executed_macs_per_token; moeut.model.accounting.executed_macs_per_token).")
    if args.preset:
        print("\nconfig: " + json.dumps(stats[args.preset]["config"]))
    return 0


def _m(n: int) -> str:
    return f"{n / 1e6:.1f}M"
