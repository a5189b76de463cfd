"""Zero-shot scoring of the paper's tasks, and lm-eval-style ``acc``/``acc_norm`` beside it.

The paper's protocol (the authors' evaluation code): no BOS token; the first token of a sequence is
never scored; context and continuation are tokenised separately and concatenated; each candidate is
scored from scratch; a candidate wins only if its score is strictly higher than every other (a tie at
the top is wrong). The score is the summed log-probability of the continuation for BLiMP, and its mean
per continuation token for CBT, HellaSwag, PIQA and ARC-Easy. LAMBADA is right when the argmax
predictions at the target word's token positions (teacher forced) decode to exactly the target.

``acc`` (summed log-probability) and ``acc_norm`` (summed log-probability per character of the choice)
follow lm-evaluation-harness: plain argmax, the first of tied candidates wins.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moeut.eval.encoding import Encoder, encode_pair
from moeut.eval.scoring import lm_eval_choice, paper_correct, score_candidates
from moeut.eval.tasks import Choice, Cloze

# how the paper scores each multiple-choice task
PAPER_SCORE = {"blimp": "sum", "cbt": "mean", "hellaswag": "mean", "piqa": "mean", "arc_easy": "mean"}
ZERO_SHOT_TASKS = ("lambada", "blimp", "cbt", "hellaswag", "piqa", "arc_easy")


@dataclass
class ChoiceScores:
    """One question: per candidate, the summed log-probability of its scored tokens, their number, and the
    characters of the choice (for ``acc_norm``)."""

    total: np.ndarray  # float64 [n_choices]
    tokens: np.ndarray  # int64
    chars: np.ndarray  # int64
    truncated: bool = False

    def paper_scores(self, how: str) -> np.ndarray:
        if how == "sum":
            return self.total
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.tokens > 0, self.total / np.maximum(self.tokens, 1), -np.inf)


def choice_candidates(encoder: Encoder, ex: Choice) -> list[tuple[list[int], int]]:
    """Token sequences and first scored positions of a question's candidates. Without a context each
    choice is a whole document (BLiMP), scored from its second token."""
    if not ex.context:
        return [(encoder.encode_context(c), 1) for c in ex.choices]
    out = []
    for c in ex.choices:
        ctx, cont = encode_pair(encoder, ex.context, c)
        out.append((ctx + cont, len(ctx)))
    return out


def score_choices(model: torch.nn.Module, encoder: Encoder, examples: Sequence[Choice], *, batch_size: int = 64,
                  max_length: int | None = None,
                  progress: Callable[[list[int]], None] | None = None) -> list[ChoiceScores]:
    questions = [choice_candidates(encoder, ex) for ex in examples]
    scored = score_candidates(model, questions, batch_size=batch_size, max_length=max_length,
                              pad_id=encoder.eos_id, progress=progress)
    out = []
    for ex, cands in zip(examples, scored):
        out.append(ChoiceScores(total=np.array([c.total for c in cands], dtype=np.float64),
                                tokens=np.array([c.n for c in cands], dtype=np.int64),
                                chars=np.array([len(ch) - ch.startswith(" ") for ch in ex.choices], dtype=np.int64),
                                truncated=any(c.truncated for c in cands)))
    return out


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
    """The result entry of a multiple-choice task (see the README's evaluation section for the keys)."""
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


def score_lambada(model: torch.nn.Module, encoder: Encoder, examples: Sequence[Cloze], *, batch_size: int = 64,
                  max_length: int | None = None, progress: Callable[[list[int]], None] | None = None) -> dict:
    """LAMBADA's result entry: ``accuracy`` (the predicted word is exactly the target), the target's
    perplexity (``target_ppl``: exp of the mean over passages of the per-token NLL, as the authors compute
    it), and lm-eval's ``acc`` (every target token is the argmax) and ``ppl`` (exp of minus the mean
    summed log-probability)."""
    questions, targets = [], []
    for ex in examples:
        ctx, cont = encode_pair(encoder, ex.context, ex.target)
        questions.append([(ctx + cont, len(ctx))])
        targets.append(encoder.decode_continuation(cont))
    scored = score_candidates(model, questions, batch_size=batch_size, max_length=max_length,
                              pad_id=encoder.eos_id, progress=progress)
    correct, greedy, mean_nll, total_ll = [], [], [], []
    for (s,), target in zip(scored, targets):
        correct.append(encoder.decode_continuation(s.greedy.tolist()) == target)
        greedy.append(s.is_greedy)
        mean_nll.append(-s.mean)
        total_ll.append(s.total)
    return {"accuracy": _mean(correct), "n": len(correct), "target_ppl": math.exp(_mean(mean_nll)),
            "acc": _mean(greedy), "ppl": math.exp(-_mean(total_ll)),
            "truncated": sum(s.truncated for (s,) in scored),
            "score": "argmax predictions at the target's tokens decode to the target word"}


def average_accuracy(results: dict[str, dict]) -> dict:
    """The paper's average of the six zero-shot accuracies, over the tasks that were evaluated."""
    done = [t for t in ZERO_SHOT_TASKS if t in results and results[t].get("accuracy") is not None]
    missing = [t for t in ZERO_SHOT_TASKS if t not in done]
    return {"accuracy": _mean(results[t]["accuracy"] for t in done) if done else None, "n": len(done),
            "tasks": done, "not_evaluated": missing}
