"""Checkpoints: one file per save, written atomically, loaded without executing pickled code.

A checkpoint is a ``torch.save`` file of plain containers of tensors, numbers and strings (model and
optimizer state, step, RNG states, the resolved configuration as JSON) loaded with
``torch.load(weights_only=True)``. It is first written to a temporary file in the same directory,
flushed to disk, then renamed over the final name, so a crash mid-save leaves the previous checkpoint
intact. The last ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moeut.errors import MoeutError
from moeut.run.layout import CHECKPOINTS

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")


class CheckpointError(MoeutError, RuntimeError):
    """A checkpoint is missing, corrupt or from an incompatible run; the message says which file."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file exists but cannot be loaded (truncated, not a moeut checkpoint, another format version).
    The message names the file and what is wrong; the verb that hit it adds what to do."""


@dataclass(frozen=True)
class SkippedCheckpoint:
    """A checkpoint file that was passed over, and why (for a corrupt file: the :class:`CheckpointError`'s text)."""

    path: Path
    reason: str


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"ckpt_{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files of a run, oldest first (temporary files of interrupted saves are ignored)."""
    d = Path(run_dir) / CHECKPOINTS
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if _NAME.match(p.name)), key=lambda p: p.name)


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Atomically write ``state`` as the checkpoint of ``step`` and delete all but the newest ``keep``."""
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, "step": step, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file safely (no pickled code); a corrupt or foreign file raises CheckpointError.

    The message says what is wrong with which file and nothing more: what to do about it depends on the
    verb (training resumes from an older file, evaluation can be pointed at another one), so callers add it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, wrong format, pickled objects, ...
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt or not a moeut checkpoint "
                                     f"({type(e).__name__}: {_first_sentence(e)})") from e
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else "?"
        raise CorruptCheckpointError(f"checkpoint {path} has format {found}, expected {FORMAT_VERSION}")
    return state


def find_latest_checkpoint(run_dir: Path, map_location: str | torch.device = "cpu"
                           ) -> tuple[tuple[Path, dict[str, Any]] | None, list[SkippedCheckpoint]]:
    """The newest loadable checkpoint of a run (None when no file loads), and the newer files that could not
    be loaded, newest first, each with the reason. Prints nothing: the caller decides how to report them."""
    skipped: list[SkippedCheckpoint] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return (path, load_checkpoint(path, map_location)), skipped
        except CheckpointError as e:  # corrupt, or deleted since it was listed
            skipped.append(SkippedCheckpoint(path, str(e)))
    return None, skipped


def latest_checkpoint(run_dir: Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """The newest loadable checkpoint of a run (skipping corrupt ones, with a warning each), or None."""
    found, skipped = find_latest_checkpoint(run_dir, map_location)
    for s in skipped:
        print(f"warning: {s.reason}; skipping it")
    return found


def _first_sentence(e: Exception) -> str:
    """torch.load's errors run to paragraphs of advice about trusting the source; the first sentence says what
    failed (the whole error stays chained as ``__cause__``)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split(". ")[0].rstrip(".")


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
