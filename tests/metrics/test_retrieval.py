"""Cross-modal retrieval: ranks of each cell's partner and recall@k."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
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


def _naive_ranks(queries: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Ranks pair by pair: a target identical to the partner ties with it, others by cosine."""
    ranks = []
    for i, query in enumerate(queries):
        own = targets[i]
        cosine = [float(query @ t) / (np.linalg.norm(query) * np.linalg.norm(t)) for t in targets]
        ranks.append(sum(1 for j, t in enumerate(targets) if np.array_equal(t, own) or cosine[j] > cosine[i]))
    return np.asarray(ranks)


@pytest.mark.parametrize("chunk_size", [2048, 100, 7, 1])
def test_identical_targets_tie_whatever_the_chunk_size(chunk_size):
    # ties count against the cell: a partner among k identical targets ranks after all of them,
    # whatever rounding noise the blocking of the product (the chunk size) gives their similarities
    rng = np.random.default_rng(0)
    n, d = 300, 16
    targets = rng.normal(size=(15, d))[rng.integers(0, 15, n)]  # each target duplicated ~20 times
    queries = targets + rng.normal(size=(n, d))
    ranks = retrieval_ranks(queries, targets, chunk_size=chunk_size)
    np.testing.assert_array_equal(ranks, _naive_ranks(queries, targets))
    collapsed = np.tile(rng.normal(size=d), (n, 1))  # every target ties with every partner
    for cells in (150, 300):
        ranks = retrieval_ranks(queries[:cells], collapsed[:cells], chunk_size=chunk_size)
        np.testing.assert_array_equal(ranks, np.full(cells, cells))


@pytest.mark.parametrize("kind", [sp.csr_matrix, sp.csr_array, sp.csc_matrix])
def test_cross_modal_retrieval_takes_a_sparse_embedding(kind):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(30, 4))
    b = a + 0.5 * rng.normal(size=a.shape)
    adata = AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(30)]), obsm={"X_a": a, "X_b": b})
    dense = cross_modal_retrieval(adata, "X_a", "X_b")
    adata.obsm["X_a"], adata.obsm["X_b"] = kind(a), kind(b)
    pd.testing.assert_frame_equal(cross_modal_retrieval(adata, "X_a", "X_b"), dense)
