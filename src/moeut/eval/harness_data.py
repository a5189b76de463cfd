"""Local-file datasets for the task YAMLs moeut ships for lm-evaluation-harness (``harness_tasks/``).

Each YAML names one of these functions as its ``custom_dataset``; lm-eval calls it with the task's
metadata (``moeut_data_dir``, set by :func:`moeut.eval.harness.run_harness`) and ``dataset_kwargs``.
The files are found exactly as ``moeut eval`` finds them (:func:`moeut.eval.files.find_task_files`, :func:`moeut.eval.examples.load_examples`), and
the documents have the fields the YAML templates use, so the prompts are lm-eval's own:

* ``lambada_openai``: ``{"text"}`` (lm-eval splits at the last space);
* ``blimp_<paradigm>``: ``{"sentence_good", "sentence_bad", "field"}``;
* ``hellaswag``, ``piqa``, ``arc_easy``: ``{"query", "choices", "gold"}`` with lm-eval's prompt already in
  ``query`` (HellaSwag preprocessed, ``"Question: {goal}\\nAnswer:"``, ``"Question: {question}\\nAnswer:"``)
  and the choices without their leading space (lm-eval's ``target_delimiter`` adds it).

The real ``lm_eval`` CLI finds the data the same way: ``MOEUT_DATA=DIR`` (or ``--metadata
'{"moeut_data_dir": "DIR"}'``). Loading these tasks also installs :func:`quiet_git_hash`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from moeut.eval.examples import Choice, load_blimp, load_examples
from moeut.eval.files import find_task_files

# the task YAMLs: ``lm_eval --include_path`` this folder (or ``moeut eval --harness``, which does)
TASKS_DIR = Path(__file__).with_name("harness_tasks")


def _dataset_dict(docs: list[dict[str, Any]]):
    import datasets  # lm-eval's dependency (the optional 'eval' extra): only lm-eval calls this module

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def lambada_openai(moeut_data_dir: str | None = None, **_: Any):
    examples = load_examples(find_task_files("lambada", moeut_data_dir))
    return _dataset_dict([{"text": ex.context + ex.target} for ex in examples])


def blimp(paradigm: str, moeut_data_dir: str | None = None, **_: Any):
    root = Path(find_task_files("blimp", moeut_data_dir).source)
    path = root / f"{paradigm}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"BLiMP paradigm file {path} does not exist")
    return _dataset_dict([{"sentence_good": ex.choices[0], "sentence_bad": ex.choices[1],
                           "field": ex.info.get("field", "")} for ex in load_blimp(path)])


def _choices(task: str, moeut_data_dir: str | None) -> list[dict[str, Any]]:
    out = []
    for ex in load_examples(find_task_files(task, moeut_data_dir)):
        ex: Choice
        query = ex.context
        if task == "piqa" and "goal" in ex.info:  # lm-eval does not strip the goal
            query = f"Question: {ex.info['goal']}\nAnswer:"
        out.append({"query": query, "choices": [c[1:] if c.startswith(" ") else c for c in ex.choices],
                    "gold": ex.gold})
    return out


def hellaswag(moeut_data_dir: str | None = None, **_: Any):
    return _dataset_dict(_choices("hellaswag", moeut_data_dir))


def piqa(moeut_data_dir: str | None = None, **_: Any):
    return _dataset_dict(_choices("piqa", moeut_data_dir))


def arc_easy(moeut_data_dir: str | None = None, **_: Any):
    return _dataset_dict(_choices("arc_easy", moeut_data_dir))


def quiet_git_hash() -> None:
    """Keep lm-eval from printing ``fatal: not a git repository`` outside a git checkout.

    ``lm_eval.simple_evaluate`` records the working directory's commit by running ``git describe --always``
    with git's stderr left on the terminal (``lm_eval.loggers.utils.get_git_commit_hash``). This replaces
    that function in ``lm_eval.evaluator`` with the same command and the same fallback, stderr discarded;
    the recorded ``git_hash`` is unchanged. Idempotent; does nothing if lm-eval is not there or has moved it.
    """
    try:
        import lm_eval.evaluator as evaluator
        from lm_eval.loggers.utils import get_commit_from_path
    except ImportError:
        return
    current = getattr(evaluator, "get_git_commit_hash", None)
    if current is None or getattr(current, "moeut_quiet", False):
        return

    def get_git_commit_hash() -> str | None:
        try:
            out = subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL)
            return out.strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):  # not a checkout, or no git
            return get_commit_from_path(os.getcwd())

    get_git_commit_hash.moeut_quiet = True  # type: ignore[attr-defined]
    evaluator.get_git_commit_hash = get_git_commit_hash
