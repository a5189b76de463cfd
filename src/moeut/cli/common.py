"""Flags every verb that loads a run shares, and the one way such a verb loads it."""

from __future__ import annotations

import argparse

from moeut.errors import MoeutError
from moeut.run import OVERRIDE_FLAG, LoadedRun, load_run


class UsageError(MoeutError, ValueError):
    """A command-line value is out of range or inconsistent; the message names the flag."""


def add_run_flags(p: argparse.ArgumentParser, *, checkpoint_help: str | None = None, checkpoint: bool = True,
                  device: bool = True) -> None:
    """``--checkpoint``, ``--tokenizer``, ``--allow-tokenizer-mismatch``, ``--device``, ``--backend``."""
    if checkpoint:
        p.add_argument("--checkpoint", required=True, metavar="RUN",
                       help=checkpoint_help or "run directory (its newest checkpoint), a checkpoint file, or a "
                                               "directory written by `moeut export-hf`")
    add_tokenizer_flags(p)
    if device:
        p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--backend", default=None, help="expert-matmul backend (default: automatic)")


def add_repeats_flag(p: argparse.ArgumentParser) -> None:
    """``--repeats R``: depth chosen at inference (the verbs that run a model: eval, generate, analyze)."""
    p.add_argument("--repeats", type=int, default=None, metavar="R",
                   help="apply the G shared layers R times instead of the trained n_layers/G (default: as trained)")


def add_tokenizer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.model or its directory (default: the one stored with the run; another one must "
                        f"be the same file unless {OVERRIDE_FLAG} is given)")
    p.add_argument(OVERRIDE_FLAG, dest="allow_tokenizer_mismatch", action="store_true",
                   help="use --tokenizer even though the run was trained with a different one (only a warning)")


def load_run_from_args(args: argparse.Namespace, path: str | None = None, *, require_tokenizer: bool = True,
                       device: str | None = None) -> LoadedRun:
    return load_run(path or args.checkpoint, tokenizer=args.tokenizer, device=device or getattr(args, "device", "auto"),
                    backend=getattr(args, "backend", None), allow_tokenizer_mismatch=args.allow_tokenizer_mismatch,
                    require_tokenizer=require_tokenizer, repeats=getattr(args, "repeats", None))


def positive(name: str, v: int | float | None, allow_zero: bool = False) -> None:
    """Raise a UsageError naming ``--name`` unless ``v`` is None or positive (or zero when allowed)."""
    if v is not None and (v < 0 or (v == 0 and not allow_zero)):
        raise UsageError(f"--{name} must be {'>= 0' if allow_zero else 'positive'}, got {v}")
