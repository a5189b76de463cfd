"""The output directory of ``moeut prepare``: which directories it may write into, and how it writes them.

Everything is built in ``out/.prepare-tmp-<pid>/`` and renamed into place at the end, ``prepare.json``
last, so a directory with a ``prepare.json`` is always complete and a failed or interrupted run leaves the
previous output (or nothing) behind. A non-empty ``out`` is replaced only when it is a previous output of the
same inputs, or with ``overwrite=True`` (which replaces only the entries below and leaves other files alone).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moeut.data.errors import DataError, OutputDirError
from moeut.data.tokenizer import TOKENIZER_JSON, TOKENIZER_MODEL
from moeut.fileio import atomic_write_json, read_json

PREPARE_FILE = "prepare.json"
PREPARE_FORMAT = "moeut-prepared"
PREPARE_FORMAT_VERSION = 1
OUTPUT_ENTRIES = ("train", "val", TOKENIZER_MODEL, TOKENIZER_JSON)  # what a run replaces; nothing else is touched
STAGING_PREFIX = ".prepare-tmp-"


def check_out_dir(out_dir: Path, inputs: list[str], overwrite: bool) -> None:
    """Refuse, before any long pass, an ``out_dir`` whose contents a run would destroy unasked."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"--out {out_dir} is a file; choose a directory")
    if not out_dir.exists() or overwrite:
        return
    contents = [p for p in out_dir.iterdir() if not p.name.startswith(STAGING_PREFIX)]
    if not contents:
        return
    if not (out_dir / PREPARE_FILE).is_file():
        names = ", ".join(sorted(p.name for p in contents)[:5])
        raise OutputDirError(f"output directory {out_dir} is not empty ({names}{', ...' if len(contents) > 5 else ''}) "
                             f"and holds no {PREPARE_FILE}, so it is not a moeut prepare output; choose another --out, "
                             "or pass --overwrite (overwrite=True) to write train/, val/ and tokenizer files into it")
    previous = _previous_inputs(out_dir)
    if previous != inputs:
        raise OutputDirError(f"output directory {out_dir} holds the prepare output of other inputs ({previous}), not "
                             f"of {inputs}; choose another --out, or pass --overwrite (overwrite=True) to replace it")


def _previous_inputs(out_dir: Path) -> Any:
    """The ``inputs`` recorded by the previous run (``None`` for an unreadable manifest: then it is not ours)."""
    try:
        return read_json(out_dir / PREPARE_FILE, "prepare manifest", "", DataError).get("inputs")
    except DataError:
        return None


@contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A fresh staging directory inside ``out_dir`` (created if needed), removed however the run ends.

    On failure an ``out_dir`` that this run created and left empty is removed too, so a failed first run
    leaves nothing behind. A staging directory left by an earlier process with the same pid is discarded.
    """
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = out_dir / f"{STAGING_PREFIX}{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created and out_dir.exists() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)


def install(stage: Path, out_dir: Path, manifest: dict[str, Any]) -> None:
    """Move the staged entries into ``out_dir``, replacing previous ones, then write ``prepare.json``.

    The old ``prepare.json`` goes first, so an interruption between the renames leaves a directory that
    is visibly incomplete; replaced entries go to the stage's trash, removed with the stage.
    """
    (out_dir / PREPARE_FILE).unlink(missing_ok=True)
    trash = stage / ".old"
    trash.mkdir()
    for name in OUTPUT_ENTRIES:
        target = out_dir / name
        if target.is_dir() and not target.is_symlink():
            os.replace(target, trash / name)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(stage / name, target)
    atomic_write_json(out_dir / PREPARE_FILE,
                      {"format": PREPARE_FORMAT, "format_version": PREPARE_FORMAT_VERSION, **manifest})
