"""The one loader every verb uses: a model with its tokenizer from a run directory, a checkpoint file, a
directory written by ``moeut export-hf``, or a run written by ``moeut import-paper``.

The tokenizer rule is the same everywhere: by default the tokenizer stored with the run is used; a
``tokenizer`` given explicitly must be the one the run recorded (same sha256), otherwise
:class:`RunTokenizerMismatch` is raised, unless ``allow_tokenizer_mismatch=True`` (``--allow-tokenizer-mismatch``
on the command line), which only warns.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from moeut.data import Tokenizer
from moeut.data.errors import TokenizerError, TokenizerMismatchError
from moeut.model import ModelConfig, build_model
from moeut.run.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from moeut.run.hf_format import is_hf_export, load_hf_model
from moeut.run.layout import TOKENIZER_MODEL, run_dir_of
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

    @property
    def name(self) -> str:
        """A short label for tables: the run directory's name."""
        return self.run_dir.name or self.source.stem


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
    else:
        if path.is_dir():
            found = latest_checkpoint(path)
            if found is None:
                raise CheckpointError(f"{path} holds no loadable checkpoint (expected {path}/checkpoints/ckpt_*.pt "
                                      f"or a `moeut export-hf` directory); train a model with `moeut train` first")
            source, state = found
        else:
            source, state = path, load_checkpoint(path)
        model = build_model(ModelConfig.from_dict(json.loads(state["model_config"])), backend=backend)
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
                     kind=kind, tokenizer_sha256=recorded, trained_repeats=trained)


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
