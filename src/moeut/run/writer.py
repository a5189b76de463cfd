"""A run directory for a model that was not trained by ``moeut train`` (an HF export turned back into a run,
a paper checkpoint imported): the layout every verb reads, with a checkpoint that holds no optimizer state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from moeut.data import Tokenizer
from moeut.fileio import atomic_write_text
from moeut.run.checkpoint import CheckpointError, list_checkpoints, save_checkpoint
from moeut.run.layout import MODEL_CONFIG


def write_model_run(run_dir: str | Path, model: nn.Module, *, tokenizer: Tokenizer | None, step: int = 0,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``model_config.json``, the tokenizer (``tokenizer.model`` + ``tokenizer.json``) and
    ``checkpoints/ckpt_<step>.pt`` (model weights, config, tokenizer sha256, ``extra``) into ``run_dir``.
    Refuses a directory that already holds checkpoints. Returns the checkpoint path."""
    run_dir = Path(run_dir)
    if list_checkpoints(run_dir):
        raise CheckpointError(f"{run_dir} already holds checkpoints; choose another directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    sha = None
    if tokenizer is not None:
        tokenizer.save(run_dir)
        sha = tokenizer.sha256
    cfg = model.cfg
    atomic_write_text(run_dir / MODEL_CONFIG, cfg.to_json())
    state = {"model": model.state_dict(), "model_config": cfg.to_json(), "tokenizer_sha256": sha, **(extra or {})}
    return save_checkpoint(run_dir, step, state, keep=0)
