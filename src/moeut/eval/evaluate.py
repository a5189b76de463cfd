"""``evaluate``: perplexity and the paper's zero-shot tasks on one model, as one results dict.

Each zero-shot task walks the steps in order: :mod:`~moeut.eval.files` (find its data) →
:mod:`~moeut.eval.examples` (read them) → :mod:`~moeut.eval.candidates` (the paper's token sequences) →
:mod:`~moeut.eval.scoring` (log-probabilities) → :mod:`~moeut.eval.aggregate` (its result entry, the average,
the table); ``ppl`` is :mod:`~moeut.eval.perplexity`.

The dict has one entry per task, keyed by the task name (``ppl``, ``lambada``, ``blimp``, ``cbt``,
``hellaswag``, ``piqa``, ``arc_easy``), each with ``n`` (examples scored; target tokens for ``ppl``) and
``accuracy`` (``ppl`` and ``bpb`` for ``ppl``), plus ``wall_s``, ``examples_per_s`` (windows per second for
``ppl``) and ``source``; and
``average``: the paper's mean of the zero-shot accuracies over the tasks evaluated (``tasks`` lists them;
``not_evaluated`` the requested ones whose data was missing), present only when at least one was evaluated.
A task whose files are missing gets ``{"accuracy": None, "n": 0, "status": "not evaluated: data not
found", "looked_for": …}``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from moeut.eval.aggregate import average_accuracy, format_row, summarize_choices, summarize_lambada
from moeut.eval.encoding import Encoder
from moeut.eval.examples import Cloze, limit_examples, load_examples
from moeut.eval.files import TASKS, TaskDataNotFound, find_task_files
from moeut.eval.perplexity import open_ppl_data, perplexity
from moeut.eval.scoring import score_choices, score_clozes

ALL_TASKS = ("ppl",) + TASKS
NOT_FOUND = "not evaluated: data not found"


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """``"ppl,blimp"`` or a list → validated task names (``all`` = every task)."""
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    out: list[str] = []
    for t in names:
        for name in (ALL_TASKS if t == "all" else [t]):
            if name not in ALL_TASKS:
                raise ValueError(f"unknown task {name!r}; choose from {', '.join(ALL_TASKS)} (or all)")
            if name not in out:
                out.append(name)
    return out


def _bar(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def score_lambada(model: torch.nn.Module, encoder: Encoder, examples: Sequence[Cloze], *, batch_size: int = 64,
                  max_length: int | None = None, progress: Callable[[list[int]], None] | None = None) -> dict:
    """LAMBADA's result entry (:func:`moeut.eval.aggregate.summarize_lambada`) from scoring ``examples``."""
    return summarize_lambada(score_clozes(model, encoder, examples, batch_size=batch_size, max_length=max_length,
                                          progress=progress))


def evaluate(model: torch.nn.Module, encoder: Encoder, tasks: Sequence[str], *, data_dir: str | Path | None = None,
             ppl_data: Sequence[str | Path] | None = None, limit: int | None = None, batch_size: int = 64,
             tokenizer_sha256: str | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on ``tasks`` (see the module docstring for the result). ``ppl_data``: text files or
    shard directories for ``ppl``. ``limit``: at most that many examples per task (per BLiMP paradigm and CBT
    type; windows per ``ppl`` set)."""
    model.eval()
    results: dict[str, Any] = {}
    for task in parse_tasks(tasks):
        t0 = time.perf_counter()
        if task == "ppl":
            results[task] = _ppl(model, encoder, ppl_data, limit, batch_size, tokenizer_sha256, progress)
        else:
            try:
                files = find_task_files(task, data_dir)
                examples = limit_examples(load_examples(files), limit)
            except TaskDataNotFound as e:
                results[task] = {"accuracy": None, "n": 0, "status": NOT_FOUND, "looked_for": str(e)}
                if log:
                    log(str(e))  # the message starts with the task name
                continue
            bar = _bar(len(examples), task, progress)
            tick = lambda done: bar.update(len(done))  # noqa: E731
            if task == "lambada":
                res = score_lambada(model, encoder, examples, batch_size=batch_size, progress=tick)
            else:
                scores = score_choices(model, encoder, examples, batch_size=batch_size, progress=tick)
                res = summarize_choices(task, examples, scores)
            bar.close()
            res["source"] = files.source
            results[task] = res
        wall = time.perf_counter() - t0
        results[task]["wall_s"] = round(wall, 3)
        n = results[task].get("n_all", results[task]["n"]) if task != "ppl" else results[task]["windows"]
        results[task]["examples_per_s"] = round(n / wall, 3) if wall > 0 else None
        if log:
            log(format_row(task, results[task]))
    average = average_accuracy(results)
    if average is not None:
        results["average"] = average
    return results


def _ppl(model, encoder, ppl_data, limit, batch_size, tokenizer_sha256, progress) -> dict[str, Any]:
    if not ppl_data:
        raise ValueError("the ppl task needs text: pass --ppl-data FILE_OR_SHARD_DIR ... (the run's own "
                         "validation split is used when its train_config.json points at it)")
    seq_len = model.cfg.context_length
    sets: dict[str, Any] = {}
    nll = tokens = nbytes = 0
    for path in ppl_data:
        ds = open_ppl_data(path, encoder, tokenizer_sha256)
        windows = ds.num_tokens // (seq_len + 1)
        bar = _bar(min(windows, limit) if limit else windows, f"ppl {Path(path).name}", progress)
        r = perplexity(model, ds, seq_len=seq_len, batch_size=max(1, batch_size // 4), max_windows=limit,
                       token_bytes=encoder.token_bytes(), progress=bar.update)
        bar.close()
        name = str(path)
        sets[name] = r.to_json()
        nll, tokens, nbytes = nll + r.nll, tokens + r.tokens, nbytes + r.bytes
    windows = sum(s["windows"] for s in sets.values())
    return {"ppl": math.exp(nll / tokens), "bpb": nll / math.log(2) / nbytes if nbytes else float("nan"),
            "n": tokens, "windows": windows, "context": seq_len, "sets": sets,
            "source": ", ".join(sets)}
