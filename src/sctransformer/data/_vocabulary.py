"""The gene vocabulary: which gene each embedding row stands for, and alignment of AnnData columns."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

logger = logging.getLogger("sctransformer")


class GeneVocabulary:
    """Ordered gene identifiers; embedding row ``i`` is gene ``genes[i]``.

    Parameters
    ----------
    genes
        Unique gene identifiers (symbols or Ensembl ids).
    """

    def __init__(self, genes: list[str] | pd.Index) -> None:
        self.index = pd.Index([str(g) for g in genes])
        if not self.index.is_unique:
            raise ValueError("gene vocabulary has duplicate identifiers")

    def __len__(self) -> int:
        return len(self.index)

    @property
    def genes(self) -> list[str]:
        """Gene identifiers in embedding-row order."""
        return self.index.tolist()

    def column_to_gene(self, identifiers: pd.Index, *, min_overlap: int = 1) -> np.ndarray:
        """Vocabulary row of each AnnData column (``-1`` where the gene is not in the vocabulary).

        Logs the coverage ("712 / 765 genes in vocabulary") and raises if fewer than
        ``min_overlap`` genes are shared.
        """
        mapping = self.index.get_indexer(pd.Index(identifiers).astype(str)).astype(np.int64)
        n_found = int((mapping >= 0).sum())
        if n_found < min_overlap:
            example = list(identifiers[:3])
            raise ValueError(
                f"the AnnData shares {n_found} genes with the model's vocabulary of {len(self)} "
                f"genes (its identifiers look like {example}, the vocabulary's like "
                f"{self.genes[:3]}); pass gene_key= the .var column with matching identifiers"
            )
        if n_found < len(identifiers):
            logger.info(
                "%d / %d genes in vocabulary (%d of the model's %d genes present)",
                n_found,
                len(identifiers),
                n_found,
                len(self),
            )
        return mapping
