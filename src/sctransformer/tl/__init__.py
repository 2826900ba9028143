"""Tools that take ``(adata, model)`` and write results into the AnnData under ``key_added``."""

from ._embed import embed
from ._gene_graph import (
    AttentionAccumulator,
    CoAttentionAccumulator,
    gene_embedding,
    gene_graph,
    gene_modules,
)
from ._perturb import perturb, predict_response
from ._predict import predict

__all__ = [
    "AttentionAccumulator",
    "CoAttentionAccumulator",
    "embed",
    "gene_embedding",
    "gene_graph",
    "gene_modules",
    "perturb",
    "predict",
    "predict_response",
]
