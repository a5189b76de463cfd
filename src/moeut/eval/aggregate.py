"""Step 5 of a task's walk: scores become the task's result entry, the paper's average, and the table.

The paper's rule: a candidate wins only if its score is strictly higher than every other (a tie at the top
is wrong). The score is the summed log-probability of the continuation for BLiMP, and its mean per
continuation token for CBT, HellaSwag, PIQA and ARC-Easy (:data:`PAPER_SCORE`). LAMBADA is right when the
argmax predictions at the target word's token positions decode to exactly the target.

``acc`` (summed log-probability) and ``acc_norm`` (summed log-probability per character of the choice)
follow lm-evaluation-harness: plain argmax, the first of tied candidates wins.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from moeut.eval.examples import Choice
from moeut.eval.files import TASKS
from moeut.eval.scoring import ChoiceScores, ClozeScores

# how the paper scores each multiple-choice task
PAPER_SCORE = {"blimp": "sum", "cbt": "mean", "hellaswag": "mean", "piqa": "mean", "arc_easy": "mean"}


# ----------------------------------------------------------------------------- rules


def strict_winner(scores: Sequence[float]) -> int | None:
    """The candidate whose score is strictly higher than every other one, or None (a tie at the top)."""
    if len(scores) == 0:
        return None
    best = int(np.argmax(scores))
    top = scores[best]
    if any(s >= top for j, s in enumerate(scores) if j != best):
        return None
    return best


def paper_correct(scores: Sequence[float], gold: int) -> bool:
    """The paper's rule: correct only if the gold candidate's score beats every other one strictly."""
    return strict_winner(scores) == gold


def lm_eval_choice(scores: Sequence[float]) -> int:
    """lm-evaluation-harness's rule: ``argmax`` (the first of tied candidates wins)."""
    return int(np.argmax(scores))


# ----------------------------------------------------------------------------- multiple choice


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else float("nan")


def choice_metrics(examples: Sequence[Choice], scores: Sequence[ChoiceScores], how: str) -> dict:
    """``accuracy`` (the paper's rule), ``acc`` and ``acc_norm`` (lm-eval's), over the given questions."""
    paper = [paper_correct(s.paper_scores(how), ex.gold) for ex, s in zip(examples, scores)]
    acc = [lm_eval_choice(s.total) == ex.gold for ex, s in zip(examples, scores)]
    norm = [lm_eval_choice(s.total / np.maximum(s.chars, 1)) == ex.gold for ex, s in zip(examples, scores)]
    return {"accuracy": _mean(paper), "acc": _mean(acc), "acc_norm": _mean(norm), "n": len(paper),
            "truncated": sum(s.truncated for s in scores)}


def summarize_choices(task: str, examples: Sequence[Choice], scores: Sequence[ChoiceScores]) -> dict:
    """The result entry of a multiple-choice task (docs/evaluation.md lists the keys)."""
    how = PAPER_SCORE.get(task, "mean")
    if task == "blimp":
        by_paradigm: dict[str, list[bool]] = defaultdict(list)
        field_of: dict[str, str] = {}
        for ex, s in zip(examples, scores):
            by_paradigm[ex.group].append(paper_correct(s.total, ex.gold))
            field_of[ex.group] = ex.info.get("field", "")
        paradigms = {k: _mean(v) for k, v in sorted(by_paradigm.items())}
        fields: dict[str, list[float]] = defaultdict(list)
        for k, acc in paradigms.items():
            fields[field_of[k]].append(acc)
        return {"accuracy": _mean(paradigms.values()), "n": len(examples),
                "accuracy_pairs": _mean(v for vs in by_paradigm.values() for v in vs),
                "fields": {k: _mean(v) for k, v in sorted(fields.items())}, "paradigms": paradigms,
                "n_paradigms": len(paradigms), "truncated": sum(s.truncated for s in scores),
                "score": "summed log-probability (first token not scored), mean of the paradigm accuracies"}
    if task == "cbt":
        groups: dict[str, list[int]] = defaultdict(list)
        for i, ex in enumerate(examples):
            groups[ex.group].append(i)
        types = {g: choice_metrics([examples[i] for i in idx], [scores[i] for i in idx], how)
                 for g, idx in sorted(groups.items())}
        out = {k: _mean(t[k] for t in types.values()) for k in ("accuracy", "acc", "acc_norm")}
        return {**out, "n": len(examples), "types": types, "truncated": sum(s.truncated for s in scores),
                "score": "mean log-probability per continuation token; mean over the CBT types"}
    if task == "arc_easy":
        four = [i for i, ex in enumerate(examples) if len(ex.choices) == 4]
        paper = choice_metrics([examples[i] for i in four], [scores[i] for i in four], how)
        every = choice_metrics(examples, scores, how)
        return {"accuracy": paper["accuracy"], "n": paper["n"], "accuracy_all": every["accuracy"],
                "n_all": every["n"], "acc": every["acc"], "acc_norm": every["acc_norm"],
                "truncated": every["truncated"],
                "score": "mean log-probability per continuation token; accuracy/n: 4-choice questions only "
                         "(the paper), *_all and acc/acc_norm: every question"}
    return {**choice_metrics(examples, scores, how), "score": "mean log-probability per continuation token"}


# ----------------------------------------------------------------------------- LAMBADA


def summarize_lambada(scores: Sequence[ClozeScores]) -> dict:
    """LAMBADA's result entry: ``accuracy`` (the predicted word is exactly the target), the target's
    perplexity (``target_ppl``: exp of the mean over passages of the per-token NLL, as the authors compute
    it), and lm-eval's ``acc`` (every target token is the argmax) and ``ppl`` (exp of minus the mean
    summed log-probability)."""
    targets = [s.target for s in scores]
    return {"accuracy": _mean(s.correct for s in scores), "n": len(targets),
            "target_ppl": math.exp(_mean(-t.mean for t in targets)), "acc": _mean(t.is_greedy for t in targets),
            "ppl": math.exp(-_mean(t.total for t in targets)), "truncated": sum(t.truncated for t in targets),
            "score": "argmax predictions at the target's tokens decode to the target word"}


# ----------------------------------------------------------------------------- every task


def average_accuracy(results: dict[str, dict]) -> dict | None:
    """The paper's average of the zero-shot accuracies over the tasks of ``results`` that were evaluated
    (``not_evaluated``: those of them that were asked for but could not be, e.g. their data is missing), or
    None when there is nothing to average."""
    asked = [t for t in TASKS if t in results]
    done = [t for t in asked if results[t].get("accuracy") is not None]
    if not done:
        return None
    return {"accuracy": _mean(results[t]["accuracy"] for t in done), "n": len(done), "tasks": done,
            "not_evaluated": [t for t in asked if t not in done]}


def _fmt(x, spec: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_row(task: str, r: dict[str, Any]) -> str:
    if r.get("status"):
        return f"{task:<10} {r['status']}"
    if task == "ppl":
        return f"{task:<10} ppl {_fmt(r['ppl'], '.2f')}  bpb {_fmt(r['bpb'])}  ({r['n']:,} tokens)"
    extra = ""
    if task == "lambada":
        extra = f"target ppl {_fmt(r['target_ppl'], '.1f')}  lm-eval acc {_fmt(r['acc'])}"
    elif "acc" in r:
        extra = f"lm-eval acc {_fmt(r['acc'])}  acc_norm {_fmt(r['acc_norm'])}"
    return f"{task:<10} accuracy {_fmt(r['accuracy'])}  {extra}  (n={r['n']:,})"


def format_table(results: dict[str, Any]) -> str:
    """The results as a fixed-width table: the paper's accuracy, lm-eval-style acc/acc_norm, n, wall time."""
    head = f"{'task':<10} {'accuracy':>9} {'acc':>7} {'acc_norm':>9} {'other':<22} {'n':>8} {'time s':>8} {'ex/s':>8}"
    lines = [head, "-" * len(head)]
    for task, r in results.items():
        if task == "average":
            continue
        if r.get("status"):
            lines.append(f"{task:<10} {r['status']}")
            continue
        if task == "ppl":
            other = f"ppl {r['ppl']:.2f} bpb {_fmt(r['bpb'], '.3f')}"
            acc = accn = paper = "-"
        else:
            paper, acc, accn = _fmt(r.get("accuracy")), _fmt(r.get("acc")), _fmt(r.get("acc_norm"))
            other = ""
            if task == "lambada":
                other, accn = f"target ppl {r['target_ppl']:.1f}", "-"
            elif task == "arc_easy":
                other = f"all {r['n_all']}: {_fmt(r['accuracy_all'])}"
            elif task == "blimp":
                other = f"{r['n_paradigms']} paradigms"
        lines.append(f"{task:<10} {paper:>9} {acc:>7} {accn:>9} {other:<22} {r['n']:>8,} {r['wall_s']:>8.1f} "
                     f"{_fmt(r.get('examples_per_s'), '.1f'):>8}")
    avg = results.get("average")
    if avg:
        lines.append("-" * len(head))
        lines.append(f"{'average':<10} {_fmt(avg['accuracy']):>9}  over {avg['n']} task(s): {', '.join(avg['tasks'])}"
                     + (f"; not evaluated: {', '.join(avg['not_evaluated'])}" if avg["not_evaluated"] else ""))
    return "\n".join(lines)
