"""``evaluate``: perplexity and the paper's zero-shot tasks on one model, as one results dict.

The dict has one entry per task, keyed by the task name (``ppl``, ``lambada``, ``blimp``, ``cbt``,
``hellaswag``, ``piqa``, ``arc_easy``), each with ``n`` (examples scored; target tokens for ``ppl``) and
``accuracy`` (``ppl`` and ``bpb`` for ``ppl``), plus ``wall_s``, ``examples_per_s`` (windows per second for
``ppl``) and ``source``; and
``average``: the paper's mean of the zero-shot accuracies over the tasks evaluated (``tasks`` lists them).
A task whose files are missing gets ``{"accuracy": None, "n": 0, "status": "not evaluated: data not
found", "looked_for": …}``.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from moeut.eval.data import TaskDataNotFound, find_task_data
from moeut.eval.encoding import Encoder
from moeut.eval.perplexity import open_ppl_data, perplexity
from moeut.eval.tasks import Choice
from moeut.eval.zeroshot import ZERO_SHOT_TASKS, average_accuracy, score_choices, score_lambada, summarize_choices

ALL_TASKS = ("ppl",) + ZERO_SHOT_TASKS
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


def limit_examples(examples: list, limit: int | None) -> list:
    """The first ``limit`` examples; for grouped tasks (BLiMP paradigms, CBT types), of each group."""
    if limit is None:
        return examples
    if examples and isinstance(examples[0], Choice) and examples[0].group:
        seen: dict[str, int] = defaultdict(int)
        out = []
        for ex in examples:
            if seen[ex.group] < limit:
                seen[ex.group] += 1
                out.append(ex)
        return out
    return examples[:limit]


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


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
                data = find_task_data(task, data_dir)
                examples = limit_examples(data.examples(), limit)
            except TaskDataNotFound as e:
                results[task] = {"accuracy": None, "n": 0, "status": NOT_FOUND, "looked_for": str(e)}
                if log:
                    log(f"{task}: {e}")
                continue
            bar = _bar(len(examples), task, progress)
            tick = lambda done: bar.update(len(done))  # noqa: E731
            if task == "lambada":
                res = score_lambada(model, encoder, examples, batch_size=batch_size, progress=tick)
            else:
                scores = score_choices(model, encoder, examples, batch_size=batch_size, progress=tick)
                res = summarize_choices(task, examples, scores)
            bar.close()
            res["source"] = data.source
            results[task] = res
        wall = time.perf_counter() - t0
        results[task]["wall_s"] = round(wall, 3)
        n = results[task].get("n_all", results[task]["n"]) if task != "ppl" else results[task]["windows"]
        results[task]["examples_per_s"] = round(n / wall, 3) if wall > 0 else None
        if log:
            log(format_row(task, results[task]))
    if any(t in results for t in ZERO_SHOT_TASKS):
        results["average"] = average_accuracy(results)
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
