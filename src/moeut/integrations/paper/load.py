"""Build a moeut model from a checkpoint of the paper's training code, and write it as a moeut run directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moeut.data import Tokenizer
from moeut.data.errors import MissingInputError, TokenizerError
from moeut.fileio import atomic_write_json
from moeut.integrations.paper.convert import config_from_paper_args, paper_to_moeut_state
from moeut.integrations.paper.reader import PaperCheckpointError, read_paper_checkpoint
from moeut.model import ModelConfig, build_model
from moeut.run import list_checkpoints, write_model_run

TOKENIZER_IN_RELEASE = "cache/<Dataset>/<Dataset>-en-<n_pieces>/tokenizer.model.model"
IMPORTED_FROM = "imported_from.json"  # provenance of an imported run, next to model_config.json


@dataclass
class PaperImport:
    """A paper checkpoint turned into a moeut model (eval mode, fp32) with what the file says about its run."""

    model: Any  # moeut.MoEUTLM
    config: ModelConfig
    step: int  # optimizer steps the run had taken (state.iter; 100000 for the paper's final checkpoints)
    args: dict[str, Any]  # run_invariants['args'], raw
    source: Path


def load_paper_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu",
                          backend: str | None = None) -> PaperImport:
    """Read ``path`` with the restricted reader, map its arguments and weights; see :func:`from_paper_checkpoint`."""
    path = Path(path)
    ck = read_paper_checkpoint(path, map_location=map_location)
    state = ck["model"]
    if "output.bias" not in state:
        raise PaperCheckpointError(f"{path}: the model has no output.bias (the LM head); not a language model "
                                   f"checkpoint of the MoEUT training code")
    args = dict(ck["run_invariants"]["args"])
    cfg = config_from_paper_args(args, vocab_size=int(state["output.bias"].shape[0]))
    model = build_model(cfg, backend=backend)
    model.load_state_dict(paper_to_moeut_state(state, cfg, model.state_dict(), source=str(path)), strict=True)
    run_state = ck.get("state") or {}
    step = int(run_state.get("iter", 0)) if isinstance(run_state, dict) else 0
    return PaperImport(model=model.to(map_location).eval(), config=cfg, step=step, args=args, source=path)


def from_paper_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu",
                          backend: str | None = None):
    """The model of a checkpoint released with the MoEUT paper (``checkpoints/C4_44M.ckpt`` …, written by the
    authors' training code) as a moeut model: returns the **model only** (a :class:`moeut.MoEUTLM`, fp32, in
    eval mode, on ``map_location``); its configuration is ``model.cfg``. ``model(tokens).logits`` is
    ``[B, T, vocab]`` for ``tokens`` ``[B, T]`` (the training code itself is time-major).

    The file is read without running any of its pickle: globals other than torch's tensor types,
    ``OrderedDict`` and the framework's ``DotDict`` (read as ``dict``) make it fail with
    :class:`~moeut.integrations.paper.UnsafeCheckpointError` before anything is loaded; storages tagged
    ``cuda:0`` load on ``map_location``. Variants moeut cannot represent raise
    :class:`~moeut.integrations.paper.UnsupportedVariantError` naming the run argument; which variants are
    verified against the training code's outputs is listed in :mod:`moeut.integrations.paper.convert`.
    The tokenizer is not in the checkpoint: use the release's SentencePiece model with
    ``moeut.data.Tokenizer`` (or ``moeut import-paper --tokenizer``)."""
    return load_paper_checkpoint(path, map_location=map_location, backend=backend).model


def find_release_tokenizer(checkpoint: Path, n_pieces: int | None) -> Path | None:
    """The SentencePiece model next to a checkpoint in the release's layout (``checkpoints/X.ckpt`` and
    ``cache/<Dataset>/<Dataset>-<variant>-<n_pieces>/tokenizer.model.model``), if exactly one fits."""
    root = Path(checkpoint).resolve().parent.parent / "cache"
    if not root.is_dir():
        return None
    pattern = f"*/*-{n_pieces}/tokenizer.model.model" if n_pieces else "*/*/tokenizer.model.model"
    found = sorted(root.glob(pattern))
    return found[0] if len(found) == 1 else None


def import_paper_run(checkpoint: str | Path, run_dir: str | Path, *, tokenizer: str | Path | None = None) -> Path:
    """Write a moeut run directory (``model_config.json``, ``checkpoints/ckpt_<step>.pt``, ``tokenizer.model``
    + ``tokenizer.json`` with its sha256) holding a paper checkpoint, for ``moeut eval``/``generate``/
    ``analyze``/``export-hf``. ``tokenizer``: the release's SentencePiece model (default: found next to the
    checkpoint in the release layout). Returns the checkpoint path written."""
    checkpoint, run_dir = Path(checkpoint), Path(run_dir)
    if list_checkpoints(run_dir):
        raise PaperCheckpointError(f"{run_dir} already holds checkpoints; choose another --out")
    imp = load_paper_checkpoint(checkpoint)
    if tokenizer is None:
        n_pieces = imp.args.get("sentencepiece.n_pieces")
        tokenizer = find_release_tokenizer(checkpoint, int(n_pieces) if n_pieces not in (None, "none") else None)
        if tokenizer is None:
            raise MissingInputError(f"no tokenizer given and none found next to {checkpoint}: pass --tokenizer with "
                                    f"the release's {TOKENIZER_IN_RELEASE} (the model needs the tokenizer it "
                                    f"was trained with)")
    tok = Tokenizer(Path(tokenizer))
    if tok.vocab_size != imp.config.vocab_size:
        raise TokenizerError(f"tokenizer {tokenizer} has {tok.vocab_size} pieces but the checkpoint's vocabulary is "
                         f"{imp.config.vocab_size}; pass the tokenizer of the same release dataset")
    provenance = {"format": "moeut_training_code", "checkpoint": str(checkpoint.resolve()), "step": imp.step,
                  "tokenizer": str(Path(tokenizer).resolve())}
    path = write_model_run(run_dir, imp.model, tokenizer=tok, step=imp.step,
                           extra={"train_config": "{}", "imported_from": str(checkpoint.resolve())})
    atomic_write_json(run_dir / IMPORTED_FROM, provenance)
    return path
