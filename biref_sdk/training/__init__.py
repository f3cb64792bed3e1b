"""Offline training of the paper's network (separate from the runtime; needs the training data)."""
from __future__ import annotations

from .data import HologramDataset, training_targets
from .loop import TrainConfig, plot_history, train, validate

__all__ = ["HologramDataset", "TrainConfig", "plot_history", "train", "training_targets", "validate"]
