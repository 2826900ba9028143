"""User-facing models."""

from ._expression import PerturbationResult
from ._gene_transformer import GeneTransformer, setup_anndata

__all__ = ["GeneTransformer", "PerturbationResult", "setup_anndata"]
