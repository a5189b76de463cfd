"""Zero-shot evaluation speed: examples per second per task, and the extrapolated time of the full sets.

    python benchmarks/eval_speed.py --checkpoint runs/demo/moeut-tiny [--data-dir ../shared/data] [--n 200]
        [--batch-size 32] [--naive] [--threads 2]

For each task, ``--n`` examples spread evenly over the set are scored the way
``moeut eval`` scores them (shared prefixes run once, candidates batched); ``--naive`` also times every
candidate as its own question (no prefix sharing) for comparison. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from moeut.eval import SentencePieceEncoder, find_task_files, load_examples
from moeut.eval.candidates import choice_candidates
from moeut.eval.evaluate import score_lambada
from moeut.eval.scoring import score_candidates, score_choices
from moeut.runtime import tune_malloc
from moeut.run import load_run


def _sample(task: str, examples: list, n: int) -> list:
    """``n`` examples spread over the whole set (files are ordered: BLiMP by paradigm, HellaSwag's long
    WikiHow items after its short ActivityNet ones), so the extrapolation is not biased."""
    step = max(1, len(examples) // n)
    return examples[::step][:n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--tasks", default="lambada,blimp,hellaswag,piqa,arc_easy")
    p.add_argument("--n", type=int, default=200, help="examples timed per task")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--naive", action="store_true", help="also time without prefix sharing")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = load_run(args.checkpoint, device=args.device)
    model, enc = run.model, SentencePieceEncoder(run.tokenizer)
    out = {"checkpoint": args.checkpoint, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
           "device": args.device, "tasks": {}}
    for task in args.tasks.split(","):
        everything = load_examples(find_task_files(task, args.data_dir))
        examples = _sample(task, everything, args.n)
        score_choices(model, enc, examples[:4], batch_size=args.batch_size) if task != "lambada" else None  # warm-up
        t0 = time.perf_counter()
        if task == "lambada":
            score_lambada(model, enc, examples, batch_size=args.batch_size)
        else:
            score_choices(model, enc, examples, batch_size=args.batch_size)
        dt = time.perf_counter() - t0
        row = {"n": len(examples), "seconds": round(dt, 2), "examples_per_s": round(len(examples) / dt, 1),
               "full_n": len(everything), "full_s_extrapolated": round(len(everything) * dt / len(examples), 1)}
        if args.naive and task != "lambada":
            alone = [[c] for ex in examples for c in choice_candidates(enc, ex)]
            t0 = time.perf_counter()
            score_candidates(model, alone, batch_size=args.batch_size, pad_id=enc.eos_id)
            nd = time.perf_counter() - t0
            row["naive_examples_per_s"] = round(len(examples) / nd, 1)
            row["prefix_sharing_speedup"] = round(nd / dt, 2)
        out["tasks"][task] = row
        print(json.dumps({task: row}), flush=True)
    out["full_s_extrapolated_total"] = round(sum(r["full_s_extrapolated"] for r in out["tasks"].values()), 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
