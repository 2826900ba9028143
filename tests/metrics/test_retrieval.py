"""Cross-modal retrieval: ranks of each cell's partner and recall@k."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

from sctransformer.metrics import cross_modal_retrieval, retrieval_ranks


def test_retrieval_ranks_refuse_embeddings_with_nan_instead_of_ranking_them_first():
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(5, 4))
    targets = queries.copy()
    targets[2] = np.nan  # e.g. a cell without counts in one modality
    with pytest.raises(ValueError, match=r"targets hold NaN or infinite values in 1 of 5 cells \(rows 2\)"):
        retrieval_ranks(queries, targets)
    queries[[1, 3], 0] = np.inf
    with pytest.raises(
        ValueError, match=r"queries hold NaN or infinite values in 2 of 5 cells \(rows 1, 3\)"
    ):
        retrieval_ranks(queries, targets)


@pytest.mark.parametrize("shape", [(3, 4), (5, 3), (5,), (5, 4, 1)])
def test_retrieval_ranks_refuse_embeddings_of_other_shapes(shape):
    queries = np.random.default_rng(1).normal(size=(5, 4))
    targets = np.ones(shape)
    with pytest.raises(ValueError, match="must be 2-D and of the same shape"):
        retrieval_ranks(queries, targets)
    with pytest.raises(ValueError, match="must be 2-D and of the same shape"):
        retrieval_ranks(targets, queries)


def test_cross_modal_retrieval_takes_a_single_k():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(30, 4))
    adata = AnnData(
        obs=pd.DataFrame(index=[f"c{i}" for i in range(30)]),
        obsm={"X_a": a, "X_b": a + 0.5 * rng.normal(size=a.shape)},
    )
    single = cross_modal_retrieval(adata, "X_a", "X_b", k=5)
    several = cross_modal_retrieval(adata, "X_a", "X_b", k=[5])
    pd.testing.assert_frame_equal(single, several)
    assert list(single.columns) == ["recall@5", "mean rank", "median rank"]
    assert cross_modal_retrieval(adata, "X_a", "X_b", k=np.int64(3)).columns[0] == "recall@3"
