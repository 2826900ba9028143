"""Plots in scanpy's style: ``ax``, ``show``, ``return_fig``."""

from ._classification import calibration, confusion_matrix
from ._embedding import embedding
from ._training_history import training_history

__all__ = ["calibration", "confusion_matrix", "embedding", "training_history"]
