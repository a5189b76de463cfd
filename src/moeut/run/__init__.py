"""The run directory: its layout, its checkpoints, and the one loader every verb uses."""

from moeut.run.checkpoint import (CheckpointError, checkpoint_path, latest_checkpoint, list_checkpoints,
                                  load_checkpoint, save_checkpoint)
from moeut.run.layout import run_dir_of, trained_val_split
from moeut.run.loader import OVERRIDE_FLAG, LoadedRun, RunTokenizerMismatch, load_run
from moeut.run.writer import write_model_run

__all__ = ["load_run", "LoadedRun", "RunTokenizerMismatch", "OVERRIDE_FLAG", "CheckpointError", "save_checkpoint",
           "load_checkpoint", "latest_checkpoint", "list_checkpoints", "checkpoint_path", "run_dir_of", "trained_val_split",
           "write_model_run"]
