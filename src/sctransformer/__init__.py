"""sctransformer: transformer models of single-cell RNA-seq data in AnnData."""

from __future__ import annotations

from . import data, datasets, metrics, module, pl, tl, train
from ._keys import KEYS
from ._settings import settings
from .model import GeneTransformer, setup_anndata
from .model._gene_transformer import __version__

__all__ = [
    "KEYS",
    "GeneTransformer",
    "__version__",
    "data",
    "datasets",
    "metrics",
    "module",
    "pl",
    "settings",
    "setup_anndata",
    "tl",
    "train",
]
