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
from pathlib import Path
from typing import Any

import torch

from moeut.errors import MoeutError
from moeut.run.layout import CHECKPOINTS

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")


class CheckpointError(MoeutError, RuntimeError):
    """A checkpoint is missing, corrupt or from an incompatible run; the message says which file."""


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
    """Load a checkpoint file safely (no pickled code); a corrupt or foreign file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, wrong format, pickled objects, ...
        raise CheckpointError(f"checkpoint {path} is corrupt or not a moeut checkpoint ({type(e).__name__}: "
                              f"{e}); delete it to resume from the previous one") from e
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {state.get('format_version') if isinstance(state, dict) else '?'}, "
                              f"expected {FORMAT_VERSION}")
    return state


def latest_checkpoint(run_dir: Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """The newest loadable checkpoint of a run (skipping corrupt ones, with a warning), or None."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as e:
            print(f"warning: {e}")
    return None


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
