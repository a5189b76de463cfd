"""``moeut`` command line: one verb per thing a user does.

    moeut info   [--preset NAME] [--context T] [--json]     parameters and compute of a preset
    moeut prepare --input PATH... --out DIR [...]           tokenizer + token shards
    moeut train  --preset NAME --data DIR --out RUN [...]   train (or --resume) a model
    moeut eval   --checkpoint RUN [--tasks ...]            perplexity, zero-shot tasks, lm-eval
    moeut generate --checkpoint RUN --prompt TEXT [...]    sample with the KV cache (streams)
    moeut export-hf --checkpoint RUN --out DIR              Hugging Face transformers directory
    moeut demo   [--out RUN] [--compare-dense]             the main job: prepare, train, evaluate, sample
    moeut analyze {residual-norm,expert-usage,...} ...      the paper's analyses: tables, JSON, plots
"""

from __future__ import annotations

import argparse
import json
import sys
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
    if args.preset:
        print("\nconfig: " + json.dumps(stats[args.preset]["config"]))
    return 0


def _m(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _cmd_demo(args: argparse.Namespace) -> int:
    from moeut.demo import run_demo

    run_demo(args.out, inputs=args.input, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
             lr=args.lr, seed=args.seed, compare_dense=args.compare_dense, prompt=args.prompt,
             max_new_tokens=args.max_new_tokens, backend=args.backend)
    return 0


# flag → TrainConfig field, for the flags that map one to one
_TRAIN_FLAGS = {"preset": "preset", "data": "data", "out": "out", "steps": "steps", "batch_size": "batch_size",
                "seq_len": "seq_len", "grad_accum": "grad_accum", "lr": "lr", "weight_decay": "weight_decay",
                "warmup": "warmup_steps", "clip": "grad_clip", "eval_every": "eval_every",
                "eval_batches": "eval_batches", "save_every": "save_every", "keep": "keep_checkpoints",
                "log_every": "log_every", "routing_every": "routing_every",
                "residual_norm_every": "residual_norm_every", "seed": "seed", "device": "device",
                "precision": "precision", "backend": "backend"}


def _cmd_train(args: argparse.Namespace) -> int:
    from moeut.train import TrainConfig, TrainingError, train

    given = {field: getattr(args, flag) for flag, field in _TRAIN_FLAGS.items() if getattr(args, flag) is not None}
    if args.fsdp:
        given["fsdp"] = True
    if args.compile:
        given["compile"] = True
    if args.model:
        from moeut.model.config import parse_overrides

        given["model_overrides"] = parse_overrides(args.model)
    cfg = TrainConfig.from_file(args.config, **given) if args.config else TrainConfig.from_dict(given)
    for name in ("data", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"--{name} is required (on the command line or in the --config file)")
    try:
        train(cfg, resume=args.resume, show_progress=not args.no_progress)
    except TrainingError as e:
        print(f"moeut train: error: {e}", file=sys.stderr)
        return 1
    return 0


def _lazy_arguments(parser: argparse.ArgumentParser, module: str, add: str, run: str) -> None:
    """Let a stage module register its own flags; its heavy imports happen only when the verb runs."""
    import importlib

    mod = importlib.import_module(module)
    getattr(mod, add)(parser)
    parser.set_defaults(func=getattr(mod, run))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeut", description="MoEUT: Mixture-of-Experts Universal Transformers")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter counts, active parameters and MACs per token of a preset")
    info.add_argument("--preset", help="preset name (default: every preset as a table)")
    info.add_argument("--context", type=int, default=None, help="context length for the MAC count "
                      "(default: the preset's, 1024 for the paper presets)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=_cmd_info)

    prep = sub.add_parser("prepare", help="train a tokenizer and write token shards (train/val split)")
    _lazy_arguments(prep, "moeut.data.prepare", "add_prepare_arguments", "run_prepare")

    tr = sub.add_parser("train", help="train a model on data written by `moeut prepare` (the paper's recipe)")
    tr.add_argument("--config", help="JSON file with TrainConfig fields; command-line flags override it")
    tr.add_argument("--preset", help="model preset (default moeut-tiny); see `moeut info`")
    tr.add_argument("--model", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a ModelConfig field, e.g. --model d_model=256 (repeatable)")
    tr.add_argument("--data", help="directory written by `moeut prepare`")
    tr.add_argument("--out", help="run directory (checkpoints, metrics.jsonl, summary.json, tensorboard/)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    for flag, typ, hlp in [("steps", int, "optimizer steps (default 1000)"),
                           ("batch_size", int, "global batch in sequences (default 16)"),
                           ("seq_len", int, "context length (default: the preset's)"),
                           ("grad_accum", int, "micro-batches per step (default 1)"),
                           ("lr", float, "peak learning rate (default 2.5e-4)"),
                           ("weight_decay", float, "AdamW weight decay (default 0.01)"),
                           ("warmup", int, "warmup steps (default per preset)"),
                           ("clip", float, "gradient clipping norm κ (default per preset; 0 = off)"),
                           ("eval_every", int, "validate every N steps (default 200)"),
                           ("eval_batches", int, "validation batches (default 0 = all)"),
                           ("save_every", int, "checkpoint every N steps (default 500)"),
                           ("keep", int, "checkpoints to keep (default 3)"),
                           ("log_every", int, "metrics line every N steps (default 10)"),
                           ("routing_every", int, "routing statistics every N steps (default 100)"),
                           ("residual_norm_every", int, "residual and update norm of every layer application "
                            "every N steps, on one validation batch (default 0 = off)"),
                           ("seed", int, "seed (default 0)"),
                           ("device", str, "auto, cpu, cuda, cuda:N (default auto)"),
                           ("precision", str, "auto, bf16, fp32 (default auto: bf16 on CUDA)"),
                           ("backend", str, "expert-matmul backend (default automatic)")]:
        tr.add_argument("--" + flag.replace("_", "-"), dest=flag, type=typ, default=None, help=hlp)
    tr.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 instead of DDP")
    tr.add_argument("--compile", action="store_true",
                    help="torch.compile the model (whole graph: the expert ops are registered custom ops)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="perplexity and the paper's zero-shot tasks, or lm-eval (--harness)")
    _lazy_arguments(ev, "moeut.eval.cli", "add_eval_arguments", "run_eval")

    gen = sub.add_parser("generate", help="sample from a trained model, streaming tokens as they are produced")
    _lazy_arguments(gen, "moeut.generate_cli", "add_generate_arguments", "run_generate")

    exp = sub.add_parser("export-hf", help="write a Hugging Face transformers model directory (safetensors)")
    _lazy_arguments(exp, "moeut.integrations.hf.cli", "add_export_arguments", "run_export")

    ana = sub.add_parser("analyze", help="the paper's analyses: residual norms, expert usage, layer similarity, "
                         "token diversity, sweeps, wall clock and memory, compute")
    _lazy_arguments(ana, "moeut.analysis.cli", "add_analyze_arguments", "run_analyze")

    demo = sub.add_parser("demo", help="the main job: tokenizer + shards, train moeut-tiny, validation "
                          "perplexity, a sample (about 5 minutes on 2 CPU cores)")
    demo.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("--input", nargs="+", default=None, metavar="PATH",
                      help="text to train on (default: the built-in corpus; see `moeut prepare --help`)")
    demo.add_argument("--steps", type=int, default=500)
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--seq-len", type=int, default=256)
    demo.add_argument("--lr", type=float, default=2e-3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--compare-dense", action="store_true", help="also train dense-tiny on the same tokens")
    demo.add_argument("--prompt", default="Once upon a time, there was a little")
    demo.add_argument("--max-new-tokens", type=int, default=60)
    demo.add_argument("--backend", default=None, help="expert-matmul backend (default: automatic)")
    demo.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:  # errors about the user's input: the message, no traceback
        if not _is_user_error(e):
            raise
        print(f"moeut {args.command}: error: {e}", file=sys.stderr)
        return 2


def _is_user_error(e: Exception) -> bool:
    """Errors whose message already names the bad input and the fix (config, data, checkpoints)."""
    if isinstance(e, (ValueError, FileNotFoundError)):
        return True
    names = {cls.__name__ for cls in type(e).__mro__}
    return bool(names & {"DataError", "CheckpointError", "TrainingError"})


if __name__ == "__main__":
    sys.exit(main())
