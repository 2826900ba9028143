"""Embedding probes and the simple baselines a transformer must be compared with."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from sctransformer._constants import TARGET_SUM
from sctransformer.data._validation import cell_positions


def log1p_normalise(counts, *, target_sum: float = TARGET_SUM) -> np.ndarray | sp.csr_matrix:
    """``log1p(counts / library size * target_sum)`` per cell; sparse input stays sparse.

    Cells without counts stay all zero.
    """
    if sp.issparse(counts):
        x = sp.csr_matrix(counts, dtype=np.float64)
        library = np.asarray(x.sum(axis=1)).ravel()
        scale = np.divide(target_sum, library, out=np.zeros_like(library), where=library > 0)
        x = sp.diags(scale) @ x
        x.data = np.log1p(x.data)
        return x.tocsr()
    x = np.asarray(counts, dtype=np.float64)
    library = x.sum(axis=1, keepdims=True)
    scale = np.divide(target_sum, library, out=np.zeros_like(library), where=library > 0)
    return np.log1p(x * scale)


def mean_log1p_normalised(
    counts, rows: np.ndarray, *, target_sum: float = TARGET_SUM, chunk_size: int = 10_000
) -> np.ndarray:
    """Mean over the cells ``rows`` (integer positions) of :func:`log1p_normalise` ``counts``.

    Only those rows are read, ``chunk_size`` at a time, so ``counts`` can be a backed matrix
    (``adata.X`` of ``read_h5ad(..., backed="r")``) that is never loaded whole.
    """
    rows = np.unique(np.asarray(rows, dtype=np.int64))  # sorted: backed matrices read increasing rows
    if len(rows) == 0:
        raise ValueError("rows is empty; pass at least one cell")
    total = np.zeros(counts.shape[1])
    for start in range(0, len(rows), chunk_size):
        block = log1p_normalise(counts[rows[start : start + chunk_size]], target_sum=target_sum)
        total += np.asarray(block.sum(axis=0)).ravel()
    return total / len(rows)


def _labelled(positions: np.ndarray, labels: np.ndarray, name: str) -> np.ndarray:
    """The cells of ``positions`` that have a label; an error if none has."""
    kept = positions[pd.notna(labels[positions])]
    if len(kept) == 0:
        raise ValueError(f"no cell of {name} has a label")
    return kept


def knn_probe_accuracy(
    embedding: np.ndarray,
    labels: np.ndarray,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    *,
    n_neighbors: int = 15,
) -> float:
    """Accuracy on ``test_idx`` of a k-nearest-neighbour classifier fitted on ``train_idx`` cells.

    A measure of how much of ``labels`` an embedding carries (Euclidean distance, majority vote).
    Cells without a label (NaN / None) are left out of both sets.
    """
    labels = np.asarray(labels, dtype=object)
    train_idx = _labelled(cell_positions(train_idx, len(labels), "train_idx"), labels, "train_idx")
    test_idx = _labelled(cell_positions(test_idx, len(labels), "test_idx"), labels, "test_idx")
    knn = KNeighborsClassifier(n_neighbors=min(n_neighbors, len(train_idx)))
    knn.fit(embedding[train_idx], labels[train_idx])
    return float((knn.predict(embedding[test_idx]) == labels[test_idx]).mean())


def logistic_regression_baseline(
    features,
    labels: np.ndarray,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    *,
    max_iter: int = 2000,
) -> np.ndarray:
    """Predicted labels of ``test_idx`` from a logistic regression fitted on ``train_idx``.

    Use with :func:`log1p_normalise` counts of all genes: often the strongest simple baseline of
    cell annotation. Training cells without a label (NaN / None) are left out; every test cell
    gets a prediction.
    """
    labels = np.asarray(labels, dtype=object)
    train_idx = _labelled(cell_positions(train_idx, len(labels), "train_idx"), labels, "train_idx")
    test_idx = cell_positions(test_idx, len(labels), "test_idx")
    clf = LogisticRegression(max_iter=max_iter)
    clf.fit(features[train_idx], labels[train_idx])
    return clf.predict(features[test_idx])
