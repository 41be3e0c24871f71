"""inkwash.train: the one training loop (`train(TrainConfig)`), EMA, and what distillation builds on."""

from inkwash.train.ema import EMA
from inkwash.train.trainer import TrainConfig, Trainer, TrainingDiverged, train

__all__ = ["EMA", "TrainConfig", "Trainer", "TrainingDiverged", "train"]
