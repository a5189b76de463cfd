"""``moeut train``: train (or resume) a model on data written by ``moeut prepare``, with the paper's recipe."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moeut.cli.common import UsageError
from moeut.model.config import parse_overrides
from moeut.run import load_run
from moeut.run.layout import TRAIN_CONFIG
from moeut.train import TrainConfig, TrainingError, TrainingStopped, train

HELP = "train a model on data written by `moeut prepare` (the paper's recipe)"

# flag → TrainConfig field, for the flags that map one to one
_FLAGS = {"preset": "preset", "out": "out", "steps": "steps", "batch_size": "batch_size",
          "seq_len": "seq_len", "grad_accum": "grad_accum", "lr": "lr", "weight_decay": "weight_decay",
          "warmup": "warmup_steps", "clip": "grad_clip", "eval_every": "eval_every",
          "eval_batches": "eval_batches", "save_every": "save_every", "save_every_minutes": "save_every_minutes",
          "keep": "keep_checkpoints",
          "log_every": "log_every", "routing_every": "routing_every",
          "residual_norm_every": "residual_norm_every", "seed": "seed", "device": "device",
          "precision": "precision", "backend": "backend", "schedule": "schedule", "decay_steps": "decay_steps",
          "decay_fraction": "decay_fraction", "decay_shape": "decay_shape", "peak_tflops": "peak_tflops",
          "init_from": "init_from", "activation_checkpointing": "activation_checkpointing",
          "wandb_project": "wandb_project", "wandb_run_name": "wandb_run_name", "wandb_entity": "wandb_entity"}


def add_arguments(tr: argparse.ArgumentParser) -> None:
    tr.add_argument("--config", help="JSON file with TrainConfig fields; command-line flags override it")
    tr.add_argument("--preset", help="model preset (default moeut-tiny); see `moeut info`")
    tr.add_argument("--model", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a ModelConfig field, e.g. --model d_model=256 (repeatable)")
    tr.add_argument("--data", action="append", metavar="DIR[:WEIGHT]",
                    help="directory written by `moeut prepare`; repeat it for a mixture, each drawn in proportion "
                         "to its WEIGHT (default 1), e.g. --data c4:3 --data code:1 (validation: the first one's val)")
    tr.add_argument("--out", help="run directory (checkpoints, metrics.jsonl, summary.json, tensorboard/)")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its newest checkpoint, with the settings saved in "
                         "--out/train_config.json (flags given with it override those that may change on resume)")
    for flag, typ, hlp in [("steps", int, "optimizer steps (default 1000)"),
                           ("batch_size", int, "global batch in sequences (default 16)"),
                           ("seq_len", int, "context length (default: the preset's)"),
                           ("grad_accum", int, "micro-batches per step (default 1)"),
                           ("lr", float, "peak learning rate (default: the preset's recipe; 2.5e-4, the paper's, for every preset)"),
                           ("weight_decay", float, "AdamW weight decay (default 0.01)"),
                           ("warmup", int, "warmup steps (default: the preset's recipe; 0 for 44M, 4000 from 126M, 50 for -tiny)"),
                           ("clip", float, "gradient clipping norm κ (default per preset; 0 = off)"),
                           ("eval_every", int, "validate every N steps (default 200)"),
                           ("eval_batches", int, "validation batches (default 0 = all)"),
                           ("save_every", int, "checkpoint every N steps (default 500)"),
                           ("save_every_minutes", float, "also checkpoint when M minutes have passed since the "
                            "last checkpoint (default 0 = off; for preemptible clusters)"),
                           ("keep", int, "checkpoints to keep (default 3)"),
                           ("log_every", int, "metrics line every N steps (default 10)"),
                           ("routing_every", int, "routing statistics every N steps (default 100)"),
                           ("residual_norm_every", int, "residual and update norm of every layer application "
                            "every N steps, on one validation batch (default 0 = off)"),
                           ("seed", int, "seed (default 0)"),
                           ("device", str, "auto, cpu, cuda, cuda:N (default auto)"),
                           ("precision", str, "auto, bf16, fp32 (default auto: bf16 on CUDA)"),
                           ("backend", str, "expert-matmul backend (default automatic)"),
                           ("wandb_project", str, "also log to this Weights & Biases project (pip install "
                            "'moeut[wandb]'; files in RUN/wandb/; WANDB_MODE=offline works)"),
                           ("wandb_run_name", str, "W&B run name"), ("wandb_entity", str, "W&B entity")]:
        tr.add_argument("--" + flag.replace("_", "-"), dest=flag, type=typ, default=None, help=hlp)
    tr.add_argument("--schedule", choices=["cosine", "wsd"], default=None,
                    help="learning-rate schedule: cosine (the paper's, default) or wsd (warmup, stable, decay: "
                         "extendable while the decay has not started)")
    tr.add_argument("--decay-steps", type=int, default=None, help="wsd: decay over the last N steps")
    tr.add_argument("--decay-fraction", type=float, default=None,
                    help="wsd: decay over this fraction of --steps (default 0.2 when --decay-steps is not given)")
    tr.add_argument("--decay-shape", choices=["linear", "cosine"], default=None,
                    help="wsd: shape of the decay to final_lr_ratio × lr (default linear)")
    tr.add_argument("--allow-schedule-change", action="store_true",
                    help="with --resume: accept other --steps / schedule settings even though the steps already "
                         "taken would have had other learning rates")
    tr.add_argument("--activation-checkpointing", nargs="?", type=int, const=1, default=None, metavar="K",
                    help="recompute every K-th layer application in the backward pass (K = 1 when omitted): "
                         "less activation memory for about one more forward pass")
    tr.add_argument("--peak-tflops", type=float, default=None,
                    help="per-device peak TFLOP/s for the mfu metric (default: a table of common GPUs in bf16; "
                         "no mfu on CPU)")
    tr.add_argument("--init-from", metavar="RUN_OR_CHECKPOINT", default=None,
                    help="start from these weights only (a moeut run, checkpoint, export-hf or import-paper "
                         "directory): fresh optimizer, schedule and data; the model configuration must match "
                         "(without --preset/--model/--config it is taken from the source)")
    tr.add_argument("--allow-tokenizer-mismatch", action="store_true",
                    help="with --init-from: train on data whose tokenizer is not the source run's (a warning)")
    tr.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 instead of DDP")
    tr.add_argument("--compile", action="store_true",
                    help="torch.compile the model (whole graph: the expert ops are registered custom ops)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")


# the base preset per architecture when the whole model configuration comes from --init-from's source
_BASE_PRESET = {"moeut": "moeut-tiny", "dense": "dense-tiny", "sut": "sut-tiny"}


def _model_of(source: str, allow_tokenizer_mismatch: bool) -> dict:
    """``--init-from`` without ``--preset``/``--model``: the source's model configuration, as every field
    written over its architecture's tiny preset (vocab_size still follows the data)."""
    src = load_run(source, device="cpu", require_tokenizer=False,
                   allow_tokenizer_mismatch=allow_tokenizer_mismatch).config
    overrides = {k: v for k, v in src.to_dict().items() if k != "vocab_size"}
    return {"preset": _BASE_PRESET[src.arch], "model_overrides": overrides}


def run(args: argparse.Namespace) -> int:
    given = {field: getattr(args, flag) for flag, field in _FLAGS.items() if getattr(args, flag) is not None}
    if args.data:  # one directory stays a plain string (as in older train_config.json files)
        given["data"] = args.data[0] if len(args.data) == 1 else list(args.data)
    if args.fsdp:
        given["fsdp"] = True
    if args.compile:
        given["compile"] = True
    if args.model:
        given["model_overrides"] = parse_overrides(args.model)
    if args.init_from and not (args.preset or args.model or args.config):
        given.update(_model_of(args.init_from, args.allow_tokenizer_mismatch))
    saved = _saved_run_config(args) if args.resume and not args.config else None
    if saved is not None:  # the run's own settings, then what this command line changes
        if "model_overrides" in given:
            given["model_overrides"] = {**saved.get("model_overrides", {}), **given["model_overrides"]}
        cfg = TrainConfig.from_dict({**saved, **given})
    else:
        cfg = TrainConfig.from_file(args.config, **given) if args.config else TrainConfig.from_dict(given)
    for name in ("data", "out"):
        if not getattr(cfg, name):
            raise UsageError(f"--{name} is required (on the command line or in the --config file)")
    try:
        train(cfg, resume=args.resume, show_progress=not args.no_progress,
              allow_schedule_change=args.allow_schedule_change,
              allow_tokenizer_mismatch=args.allow_tokenizer_mismatch)
    except TrainingError as e:
        print(f"moeut train: error: {e}", file=sys.stderr)
        return 1
    except TrainingStopped as e:
        if not e.quiet:
            print(f"moeut train: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def _saved_run_config(args: argparse.Namespace) -> dict | None:
    """``--resume --out RUN`` without ``--config``: the settings saved in ``RUN/train_config.json`` (None for a
    directory without one). ``out`` is the directory given, so a moved or copied run resumes where it is now."""
    if not args.out:
        raise UsageError("--resume needs --out RUN, the run directory to continue")
    path = Path(args.out) / TRAIN_CONFIG
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON ({e}): restore it, or pass every setting with --config "
                         f"FILE.json or flags") from None
    if not isinstance(saved, dict):
        raise UsageError(f"{path} does not hold a training configuration (a JSON object)")
    return {**saved, "out": args.out}
