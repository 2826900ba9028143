"""User-facing models."""

from ._gene_transformer import GeneTransformer, setup_anndata

__all__ = ["GeneTransformer", "setup_anndata"]
