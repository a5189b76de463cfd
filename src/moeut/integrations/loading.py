"""Load a trained model with its tokenizer from a run directory, a checkpoint file or a Hugging Face export."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class LoadedRun:
    """A model ready for inference, the tokenizer it was trained with, and where they came from."""

    model: Any  # MoEUTLM, in eval mode
    tokenizer: Any  # moeut.data.Tokenizer
    source: Path  # the checkpoint file, or the exported directory
    step: int | None  # training step of the checkpoint, when known
    kind: str  # "checkpoint" or "hf"


def is_hf_export(path: str | Path) -> bool:
    """True for a directory holding a transformers ``config.json`` with ``model_type: "moeut"``."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "moeut"
    except (json.JSONDecodeError, OSError, AttributeError):
        return False


def _run_dir_of(checkpoint_file: Path) -> Path:
    return checkpoint_file.parent.parent if checkpoint_file.parent.name == "checkpoints" else checkpoint_file.parent


def load_run(path: str | Path, *, tokenizer: str | Path | None = None, device: str = "cpu",
             backend: str | None = None) -> LoadedRun:
    """The model and tokenizer of a run directory (its newest loadable checkpoint), of one checkpoint file,
    or of a directory written by ``moeut export-hf``.

    The tokenizer comes from the run (``tokenizer.model`` next to ``checkpoints/``) unless ``tokenizer``
    names a file or directory; a tokenizer other than the one the checkpoint was trained with is an error
    (a warning when given explicitly).
    """
    import torch

    from moeut.data import Tokenizer
    from moeut.model import ModelConfig, build_model
    from moeut.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass a run directory (written by `moeut train`), "
                                f"a checkpoint file or a directory written by `moeut export-hf`")
    if path.is_dir() and is_hf_export(path):
        from moeut.integrations.hf.export import import_hf

        model = import_hf(path, backend=backend)
        hf_cfg = json.loads((path / "config.json").read_text())
        expected_sha, step, kind, source = hf_cfg.get("moeut_tokenizer_sha256"), hf_cfg.get("moeut_step"), "hf", path
        tok_default = path / "tokenizer.model"
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
        expected_sha, step, kind = state.get("tokenizer_sha256"), state.get("step"), "checkpoint"
        tok_default = _run_dir_of(source) / "tokenizer.model"

    tok_path = Path(tokenizer) if tokenizer is not None else tok_default
    if tok_path.is_dir():
        tok_path = tok_path / "tokenizer.model"
    if not tok_path.is_file():
        raise FileNotFoundError(f"no tokenizer at {tok_path}: the run directory should hold tokenizer.model "
                                f"(copied by `moeut train`); pass --tokenizer PATH")
    # constructed from the model file alone: an exported directory's tokenizer.json is transformers', not moeut's
    tok = Tokenizer(tok_path)
    if expected_sha and tok.sha256 != expected_sha:
        msg = (f"tokenizer {tok_path} (sha256 {tok.sha256[:12]}…) is not the one {source} was trained with "
               f"(sha256 {expected_sha[:12]}…)")
        if tokenizer is None:
            raise ValueError(msg + "; pass the right one with --tokenizer PATH")
        print(f"warning: {msg}")
    if tok.vocab_size != model.cfg.vocab_size:
        raise ValueError(f"tokenizer {tok_path} has {tok.vocab_size} pieces but the model's vocabulary is "
                         f"{model.cfg.vocab_size}; pass the tokenizer the model was trained with")
    model.to(torch.device(device))
    return LoadedRun(model=model, tokenizer=tok, source=source, step=step, kind=kind)
