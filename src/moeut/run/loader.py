"""The one loader every verb uses: a model with its tokenizer from a run directory, a checkpoint file, a
directory written by ``moeut export-hf``, or a run written by ``moeut import-paper``.

The tokenizer rule is the same everywhere: by default the tokenizer stored with the run is used; a
``tokenizer`` given explicitly must be the one the run recorded (same sha256), otherwise
:class:`RunTokenizerMismatch` is raised, unless ``allow_tokenizer_mismatch=True`` (``--allow-tokenizer-mismatch``
on the command line), which only warns.

A run directory loads its newest checkpoint that loads: a newer file that is corrupt is skipped with a warning on
stderr, and :attr:`LoadedRun.skipped` lists it, so a verb can say which checkpoint it used and why it is not the
newest (:meth:`LoadedRun.describe`, :meth:`LoadedRun.not_newest`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeut.data import Tokenizer
from moeut.data.errors import TokenizerError, TokenizerMismatchError
from moeut.model import ModelConfig, build_model
from moeut.run.checkpoint import (CheckpointError, CorruptCheckpointError, SkippedCheckpoint, find_latest_checkpoint,
                                  list_checkpoints, load_checkpoint)
from moeut.run.hf_format import is_hf_export, load_hf_model
from moeut.run.layout import CHECKPOINTS, TOKENIZER_MODEL, run_dir_of
from moeut.runtime import resolve_device

OVERRIDE_FLAG = "--allow-tokenizer-mismatch"


class RunTokenizerMismatch(TokenizerMismatchError):
    """The tokenizer given for a run is not the one the run was trained with."""


@dataclass
class LoadedRun:
    """A model ready for inference (eval mode, on its device), the tokenizer it was trained with, and where
    they came from."""

    model: torch.nn.Module
    config: ModelConfig
    tokenizer: Tokenizer | None  # None only with ``require_tokenizer=False`` when the run has none
    run_dir: Path  # the run (or exported) directory
    step: int | None  # training step of the checkpoint, when known
    source: Path  # the checkpoint file, or the exported directory
    kind: str  # "checkpoint" or "hf"
    tokenizer_sha256: str | None = None  # what the run recorded
    trained_repeats: int | None = None  # n_layers/G as trained (``config`` may be at another depth: ``repeats``)
    # the run's checkpoints newer than ``source`` that were not loaded, newest first, each with the reason
    skipped: tuple[SkippedCheckpoint, ...] = field(default=())

    @property
    def name(self) -> str:
        """A short label for tables: the run directory's name."""
        return self.run_dir.name or self.source.stem

    @property
    def is_newest(self) -> bool:
        """Whether ``source`` is the newest checkpoint of its run (an export is its own newest)."""
        return not self.skipped

    def describe(self) -> str:
        """What was loaded, e.g. ``checkpoint runs/a/checkpoints/ckpt_00000500.pt (step 500)``."""
        what = "checkpoint" if self.kind == "checkpoint" else "Hugging Face export"
        step = "step unknown" if self.step is None else f"step {self.step}"
        return f"{what} {self.source} ({step})"

    def not_newest(self) -> str | None:
        """None when ``source`` is the run's newest checkpoint; else why it is not, naming the newer files."""
        if not self.skipped:
            return None
        return "not the newest checkpoint of the run: " + "; ".join(s.reason for s in self.skipped)


def load_run(path: str | Path, *, tokenizer: str | Path | None = None, device: str | torch.device = "auto",
             backend: str | None = None, allow_tokenizer_mismatch: bool = False,
             require_tokenizer: bool = True, repeats: int | None = None) -> LoadedRun:
    """Load ``path`` (a run directory: its newest loadable checkpoint; a checkpoint file; an export).

    ``tokenizer``: a ``tokenizer.model`` file or a directory holding one (default: the run's own).
    ``require_tokenizer=False`` returns ``tokenizer=None`` instead of failing when the run has none and
    none is given (analyses on prepared shards need no tokenizer). ``repeats``: apply the shared layers
    that many times instead of the trained n_layers/G (depth at inference, :meth:`LanguageModel.set_repeats`);
    ``config`` is then the model at that depth and ``trained_repeats`` says what it was trained with.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass a run directory (written by `moeut train` "
                                f"or `moeut import-paper`), a checkpoint file or a directory written by `moeut export-hf`")
    dev = resolve_device(device)
    if path.is_dir() and is_hf_export(path):
        model, hf_cfg = load_hf_model(path, backend=backend)
        recorded, step, kind, source, run_dir = (hf_cfg.get("moeut_tokenizer_sha256"), hf_cfg.get("moeut_step"),
                                                 "hf", path, path)
        skipped = ()
    else:
        source, state, skipped = _checkpoint(path)
        cfg = ModelConfig.from_saved(state["model_config"], source=f"checkpoint {source}")
        model = build_model(cfg, backend=backend)
        model.load_state_dict(state["model"])
        model.eval()
        recorded, step, kind, run_dir = state.get("tokenizer_sha256"), state.get("step"), "checkpoint", run_dir_of(source)

    tok = _tokenizer_for(run_dir, source, tokenizer, recorded, allow_tokenizer_mismatch, require_tokenizer)
    if tok is not None and tok.vocab_size > model.cfg.vocab_size:
        raise TokenizerError(f"tokenizer {tok.model_path} has {tok.vocab_size} pieces but the model's vocabulary is "
                             f"{model.cfg.vocab_size}; pass the tokenizer the model was trained with")
    trained = model.cfg.n_repeats
    if repeats is not None:
        model.set_repeats(repeats)
    model.to(dev)
    return LoadedRun(model=model, config=model.cfg, tokenizer=tok, run_dir=run_dir, step=step, source=source,
                     kind=kind, tokenizer_sha256=recorded, trained_repeats=trained, skipped=skipped)


def _checkpoint(path: Path) -> tuple[Path, dict, tuple[SkippedCheckpoint, ...]]:
    """The checkpoint file to load for ``path`` (a run directory or a checkpoint file), its state, and the run's
    newer checkpoints that were not loaded. A corrupt newer file of a run directory is skipped with a warning."""
    if path.is_file():
        return path, load_checkpoint(path), _newer_than(path)
    found, skipped = find_latest_checkpoint(path)
    if found is None:
        if skipped:
            reasons = "; ".join(s.reason for s in skipped)
            raise CorruptCheckpointError(f"{path} holds no loadable checkpoint: {reasons}")
        raise CheckpointError(f"{path} holds no checkpoint (expected {path}/{CHECKPOINTS}/ckpt_*.pt or a "
                              f"`moeut export-hf` directory); train a model with `moeut train` first")
    source, state = found
    for s in skipped:
        print(f"warning: {s.reason}; loaded the newest checkpoint that loads instead: {source} "
              f"(step {state.get('step')})", file=sys.stderr)
    return source, state, tuple(skipped)


def _newer_than(path: Path) -> tuple[SkippedCheckpoint, ...]:
    """The checkpoints of ``path``'s run that are newer than the file ``path`` asked for by name."""
    if path.parent.name != CHECKPOINTS:
        return ()
    newer = [p for p in list_checkpoints(path.parent.parent) if p.name > path.name]
    return tuple(SkippedCheckpoint(p, f"{p} is newer ({path.name} was asked for by name)") for p in reversed(newer))


def _tokenizer_for(run_dir: Path, source: Path, given: str | Path | None, recorded: str | None,
                   allow_mismatch: bool, required: bool) -> Tokenizer | None:
    tok_path = Path(given) if given is not None else run_dir / TOKENIZER_MODEL
    if tok_path.is_dir():
        tok_path = tok_path / TOKENIZER_MODEL
    if not tok_path.is_file():
        if given is None and not required:
            return None
        where = f"--tokenizer {given}" if given is not None else f"the run directory ({tok_path})"
        raise TokenizerError(f"no tokenizer at {where}: a run directory holds tokenizer.model (copied by "
                             f"`moeut train`); pass --tokenizer PATH")
    # constructed from the model file alone: an exported directory's tokenizer.json is transformers', not moeut's
    tok = Tokenizer(tok_path)
    if recorded and tok.sha256 != recorded:
        msg = (f"tokenizer mismatch: {tok_path} (sha256 {tok.sha256[:12]}…) is not the tokenizer {source} was "
               f"trained with (sha256 {recorded[:12]}…)")
        if not allow_mismatch:
            fix = ("pass the run's tokenizer with --tokenizer" if given is not None
                   else "the run's tokenizer.model was replaced; put back the original or pass it with --tokenizer")
            raise RunTokenizerMismatch(f"{msg}: scores and samples would be meaningless; {fix}, or pass "
                                       f"{OVERRIDE_FLAG} if you really mean to use this one")
        print(f"warning: {msg} (using it anyway: {OVERRIDE_FLAG})", file=sys.stderr)
    return tok
