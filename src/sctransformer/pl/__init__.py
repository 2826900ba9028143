"""Plots in scanpy's style: ``ax``, ``show``, ``return_fig``."""

from ._classification import calibration, confusion_matrix
from ._embedding import embedding
from ._gene_graph import attention, gene_graph, gene_modules
from ._integration import integration
from ._perturbation import perturbation, response
from ._training_history import training_history

__all__ = [
    "attention",
    "calibration",
    "confusion_matrix",
    "embedding",
    "gene_graph",
    "gene_modules",
    "integration",
    "perturbation",
    "response",
    "training_history",
]
