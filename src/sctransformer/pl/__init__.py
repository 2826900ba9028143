"""Plots in scanpy's style: ``ax``, ``show``, ``return_fig``."""

from ._embedding import embedding
from ._training_history import training_history

__all__ = ["embedding", "training_history"]
