"""Training: the paper's recipe, checkpoints that resume exactly, metrics, several devices."""

from moeut.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_model, save_checkpoint
from moeut.train.config import TrainConfig
from moeut.train.trainer import TrainingError, evaluate_ppl, train

__all__ = ["TrainConfig", "train", "TrainingError", "evaluate_ppl", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint", "CheckpointError", "load_model"]
