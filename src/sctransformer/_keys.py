"""Every default AnnData key that sctransformer writes, defined once."""

from __future__ import annotations

from typing import NamedTuple


class _Keys(NamedTuple):
    #: ``.obsm`` key of the cell embedding written by :func:`sctransformer.tl.embed`.
    EMBEDDING: str = "X_sct"
    #: Prefix of the ``.obs`` columns written by :func:`sctransformer.tl.predict`:
    #: ``f"{PREDICTION}_{phenotype}"`` and ``f"{PREDICTION}_{phenotype}_confidence"``.
    PREDICTION: str = "sct"
    #: ``.uns`` key under which ``tl`` functions record their parameters.
    UNS: str = "sct"
    #: Suffix of the ``.obs`` column that holds prediction confidence.
    CONFIDENCE_SUFFIX: str = "confidence"
    #: Label of cells whose prediction confidence is below ``min_confidence``.
    UNKNOWN: str = "unknown"
    #: Suffix of the ``.obs`` column of labels after a majority vote over clusters.
    MAJORITY_SUFFIX: str = "majority_voting"
    #: ``.varp`` key of the gene graph written by :func:`sctransformer.tl.gene_graph`.
    GENE_GRAPH: str = "sct_gene_graph"
    #: ``.varm`` key of the gene embedding written by :func:`sctransformer.tl.gene_embedding`.
    GENE_EMBEDDING: str = "sct_gene_embedding"
    #: ``.var`` column of the modules written by :func:`sctransformer.tl.gene_modules`.
    GENE_MODULE: str = "sct_gene_module"
    #: ``.uns`` key (and ``.obsm`` prefix) of in-silico perturbation results.
    PERTURBATION: str = "sct_perturb"


KEYS = _Keys()


def prediction_key(key_added: str, phenotype: str) -> str:
    """``.obs`` column that holds the predicted label of ``phenotype``."""
    return f"{key_added}_{phenotype}"


def confidence_key(key_added: str, phenotype: str) -> str:
    """``.obs`` column that holds the confidence of the prediction of ``phenotype``."""
    return f"{key_added}_{phenotype}_{KEYS.CONFIDENCE_SUFFIX}"
