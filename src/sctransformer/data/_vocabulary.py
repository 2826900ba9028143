"""The gene vocabulary: which gene each embedding row stands for, and alignment of AnnData columns."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd

logger = logging.getLogger("sctransformer")

#: Share of the model's genes that an AnnData must have for :meth:`GeneVocabulary.column_to_gene`
#: not to warn. Below half of them, most of what the model learned to read is missing from the
#: cells (a mismatch of identifiers, or a panel or gene subset much smaller than the training data).
MIN_VOCABULARY_SHARE = 0.5
#: How :meth:`GeneVocabulary.column_to_gene` says to fix identifiers unlike the vocabulary's where
#: the caller takes a ``gene_key`` (``setup_anndata``); a model's own settings need another fix.
GENE_KEY_FIX = "pass gene_key= the .var column with matching identifiers"


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

    def column_to_gene(
        self, identifiers: pd.Index, *, min_overlap: int = 1, fix: str | Callable[[], str] = GENE_KEY_FIX
    ) -> np.ndarray:
        """Vocabulary row of each AnnData column (``-1`` where the gene is not in the vocabulary).

        Logs the coverage ("712 / 765 genes in vocabulary (712 of the model's 2000 genes
        present)") whenever some of the AnnData's genes are not in the vocabulary or some of the
        vocabulary's genes are not in the AnnData, warns when fewer than
        :data:`MIN_VOCABULARY_SHARE` of the vocabulary's genes are present, and raises if fewer
        than ``min_overlap`` genes are shared.

        Parameters
        ----------
        identifiers
            Gene identifier of each AnnData column.
        min_overlap
            Fewest shared genes accepted.
        fix
            How to give the AnnData matching identifiers, said in the error and the warning (or
            a function that writes it, called only then); default :data:`GENE_KEY_FIX` (pass
            ``gene_key=``). Where the ``gene_key`` is a model's, which inference and loading do
            not take: where to put the identifiers (``model_gene_fix`` of ``data/_validation.py``).
        """
        mapping = self.index.get_indexer(pd.Index(identifiers).astype(str)).astype(np.int64)
        n_found = int((mapping >= 0).sum())
        if n_found < min_overlap:
            example = list(identifiers[:3])
            raise ValueError(
                f"the AnnData shares {n_found} genes with the model's vocabulary of {len(self)} "
                f"genes (its identifiers look like {example}, the vocabulary's like "
                f"{self.genes[:3]}); {fix() if callable(fix) else fix}"
            )
        n_present = len(np.unique(mapping[mapping >= 0]))  # distinct genes: columns may repeat one
        if n_found < len(identifiers) or n_present < len(self):
            logger.info(
                "%d / %d genes in vocabulary (%d of the model's %d genes present)",
                n_found,
                len(identifiers),
                n_present,
                len(self),
            )
        if n_present < MIN_VOCABULARY_SHARE * len(self):
            fix = fix() if callable(fix) else fix
            warnings.warn(
                f"the AnnData has {n_present} of the model's {len(self)} genes "
                f"({n_present / len(self):.1%}, under {MIN_VOCABULARY_SHARE:.0%}): the model sees its cells "
                "through few of the genes it learned from, so their embeddings and predictions may be "
                "unreliable; keep all genes of the AnnData (not a subset such as highly variable genes), "
                f"check that its identifiers match the vocabulary's ({fix}), or use a model trained on "
                "these genes",
                UserWarning,
                stacklevel=2,
            )
        return mapping
