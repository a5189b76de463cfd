"""Training: the paper's recipe, checkpoints that resume exactly, metrics, several devices."""

from moeut.train.config import TrainConfig
from moeut.train.step import StepResult, autocast_for, train_step
from moeut.train.trainer import TrainingError, evaluate_ppl, train

__all__ = ["TrainConfig", "train", "TrainingError", "evaluate_ppl", "train_step", "StepResult", "autocast_for"]
