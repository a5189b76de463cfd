"""Restricted reader of the MoEUT paper's released checkpoints (``checkpoints/C4_44M.ckpt`` …).

The files were written by the authors' training framework (``RobertCsordas/moeut_training_code``): a
``torch.save`` zip whose pickle names ``collections.OrderedDict``, the tensor rebuild functions and storages,
and one class of that framework, ``framework.data_structures.dotdict.DotDict`` (a ``dict`` subclass holding
``state``). Nothing of the framework is imported: the file is first scanned for the globals its pickle names
(without unpickling anything); if any is outside torch's weights-only allow-list other than ``DotDict``, the
file is refused before it is loaded. It is then loaded with ``torch.load(weights_only=True)`` with ``DotDict``
read as a plain ``dict``, always with a ``map_location`` (files saved on a GPU tag their storages ``cuda:0``).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from moeut.run.checkpoint import CheckpointError

DOTDICT = "framework.data_structures.dotdict.DotDict"
REQUIRED_KEYS = ("model", "run_invariants")


class PaperCheckpointError(CheckpointError):
    """A file is not a usable checkpoint of the paper's training code; the message names the file and why."""


class UnsafeCheckpointError(PaperCheckpointError):
    """The checkpoint's pickle names globals a weights-only load must not resolve (it could run code).

    ``globals`` lists them (``module.qualname``). Nothing of the file was unpickled."""

    def __init__(self, path: Path, names: list[str]):
        self.path, self.globals = Path(path), list(names)
        super().__init__(f"{path}: refused to load: its pickle names the global(s) {', '.join(names)}, which a "
                         f"checkpoint of the MoEUT training code does not contain (it names only torch's tensor "
                         f"types, collections.OrderedDict and {DOTDICT}); nothing in it was run")


def unsafe_globals(path: str | Path) -> list[str]:
    """The globals named by the checkpoint's pickle that a weights-only load would reject, ``DotDict`` excluded.

    Reads the pickle opcodes only (``torch.serialization.get_unsafe_globals_in_checkpoint``); executes nothing."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise PaperCheckpointError(f"{path} is not a torch.save zip archive; the paper's checkpoints are "
                                   f"(pass the .ckpt file downloaded from robertcsordas/moeut_training_checkpoints)")
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # a damaged archive or pickle
        raise PaperCheckpointError(f"{path} could not be scanned ({type(e).__name__}: {e}); is the download "
                                   f"complete?") from e
    return sorted(g for g in found if g != DOTDICT)


def read_paper_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint as plain containers: ``{'state', 'run_invariants': {'args': {...}}, 'model': OrderedDict, …}``.

    Raises :class:`UnsafeCheckpointError` (before loading) if the pickle names any other global, and
    :class:`PaperCheckpointError` for a missing, damaged or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise PaperCheckpointError(f"checkpoint {path} does not exist")
    bad = unsafe_globals(path)
    if bad:
        raise UnsafeCheckpointError(path, bad)
    try:
        with torch.serialization.safe_globals([(dict, DOTDICT)]):
            ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise PaperCheckpointError(f"{path} could not be loaded as a paper checkpoint ({type(e).__name__}: "
                                   f"{e})") from e
    if not isinstance(ck, dict) or any(k not in ck for k in REQUIRED_KEYS):
        keys = sorted(ck) if isinstance(ck, dict) else type(ck).__name__
        raise PaperCheckpointError(f"{path} is not a checkpoint of the MoEUT training code: expected the keys "
                                   f"{list(REQUIRED_KEYS)}, found {keys}")
    inv = ck["run_invariants"]
    if not isinstance(inv, dict) or not isinstance(inv.get("args"), dict):
        raise PaperCheckpointError(f"{path}: run_invariants['args'] (the run's command-line arguments) is missing")
    return ck
