"""The run directory written by ``moeut train`` (and by ``moeut import-paper`` / ``export-hf --to-run``):
the one place that knows its file names.

    RUN/
      train_config.json      TrainConfig of the run (absent for imported runs)
      model_config.json      ModelConfig
      tokenizer.model        the SentencePiece model the run was trained with (+ tokenizer.json metadata)
      checkpoints/ckpt_XXXXXXXX.pt   one file per save, newest = highest step
      metrics.jsonl  summary.json  tensorboard/  wandb/
"""

from __future__ import annotations

import json
from pathlib import Path

from moeut.data.mixture import MixtureSpecError, parse_sources
from moeut.data.shards import META_FILE
from moeut.data.tokenizer import TOKENIZER_JSON, TOKENIZER_MODEL

TRAIN_CONFIG = "train_config.json"
MODEL_CONFIG = "model_config.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
TENSORBOARD = "tensorboard"
WANDB = "wandb"  # W&B's own files (wandb.init(dir=RUN) writes RUN/wandb/)
WANDB_RUN_ID = "moeut_run_id.txt"  # inside RUN/wandb/: the W&B run id, so a resumed run continues the same W&B run
HF_CONFIG = "config.json"  # of a directory written by `moeut export-hf`

__all__ = ["TRAIN_CONFIG", "MODEL_CONFIG", "CHECKPOINTS", "METRICS", "SUMMARY", "TENSORBOARD", "WANDB", "WANDB_RUN_ID", "HF_CONFIG",
           "TOKENIZER_MODEL", "TOKENIZER_JSON", "run_dir_of", "trained_val_split"]


def run_dir_of(path: str | Path) -> Path:
    """The run directory of a run directory, of a checkpoint file in ``RUN/checkpoints/`` (or directly in
    ``RUN/``), or of an exported directory (itself)."""
    path = Path(path)
    if path.is_dir():
        return path
    parent = path.parent
    if parent.name == CHECKPOINTS:
        return parent.parent
    return parent


def trained_val_split(run_dir: str | Path) -> list[Path]:
    """The validation split of the data a run was trained on (``train_config.json``'s ``data``/val; the first
    directory's for a mixture), when it is
    still there; else an empty list."""
    run_dir = Path(run_dir)
    try:
        data = json.loads((run_dir / TRAIN_CONFIG).read_text()).get("data")
    except (OSError, ValueError, AttributeError):
        return []
    if not data:
        return []
    try:  # a mixture is validated on its first directory's val split
        data = parse_sources(data)[0].dir
    except MixtureSpecError:
        return []
    for cand in (Path(data) / "val", run_dir / data / "val"):
        if (cand / META_FILE).exists():
            return [cand]
    return []
