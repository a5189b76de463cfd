"""Training: the paper's recipe, checkpoints that resume exactly, metrics, several devices."""

from moeut.train.config import TrainConfig
from moeut.train.errors import TrainingError, TrainingStopped
from moeut.train.step import StepResult, autocast_for, train_step
from moeut.train.trainer import Trainer, evaluate_ppl, train

__all__ = ["TrainConfig", "train", "Trainer", "TrainingError", "TrainingStopped", "evaluate_ppl", "train_step",
           "StepResult", "autocast_for"]
