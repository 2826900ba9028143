"""Embedding probes and the simple baselines a transformer must be compared with."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from sctransformer._constants import TARGET_SUM
from sctransformer.data._validation import cell_positions

if TYPE_CHECKING:
    from numpy.typing import ArrayLike


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


def _label_codes(labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Integer code of each cell's label (-1 where it is missing) and the labels the codes stand for.

    scikit-learn's classifiers refuse labels of no single kind ("Unknown label type"), such as the
    object arrays that keep a missing label's NaN beside integers, so they are fitted on these codes
    and their predictions mapped back. The codes number the labels in sorted order (order of first
    appearance where labels of mixed types do not sort), as scikit-learn numbers its classes: a
    classifier fitted on the codes predicts what it would on labels it accepts as they are.

    Parameters
    ----------
    labels
        Label of each cell (strings, integers, floats or booleans; ``None`` / NaN where missing).

    Returns
    -------
    The code of each cell and the distinct labels (an object array), ``labels[code]``.
    """
    # object dtype: np.asarray of a list mixing strings and NaN would turn the NaN into the string "nan"
    values = np.asarray(labels, dtype=object)
    if values.ndim != 1:
        raise ValueError(f"labels must be 1-D (one label per cell), got shape {values.shape}")
    codes, uniques = pd.factorize(values, sort=True)
    return codes, np.asarray(uniques, dtype=object)


def _cells_matrix(x: ArrayLike | sp.spmatrix, n_cells: int, name: str) -> np.ndarray | sp.csr_matrix:
    """``x`` as a cells x features matrix that integer positions index: CSR if sparse, else an array.

    A :class:`pandas.DataFrame` (which ``x[positions]`` would index by column) or a list of rows
    becomes an array; ``x`` must have one row per label.
    """
    x = x.tocsr() if sp.issparse(x) else np.asarray(x)
    if x.ndim != 2 or x.shape[0] != n_cells:
        raise ValueError(
            f"{name} must be a cells x features matrix with one row per label ({n_cells}), "
            f"got shape {x.shape}"
        )
    return x


def _check_disjoint(train_idx: np.ndarray, test_idx: np.ndarray) -> None:
    """Raise if training and test cells overlap: a test cell found among the training cells inflates a score."""
    overlap = np.intersect1d(train_idx, test_idx)
    if len(overlap):
        raise ValueError(
            f"train_idx and test_idx share {len(overlap)} cells (e.g. {overlap[:5].tolist()}); "
            "pass disjoint training and test cells"
        )


def _labelled(positions: np.ndarray, codes: np.ndarray, name: str) -> np.ndarray:
    """The cells of ``positions`` that have a label (code >= 0); an error if none has."""
    kept = positions[codes[positions] >= 0]
    if len(kept) == 0:
        raise ValueError(f"no cell of {name} has a label")
    return kept


def knn_probe_accuracy(
    embedding: ArrayLike | sp.spmatrix,
    labels: ArrayLike,
    train_idx: ArrayLike,
    test_idx: ArrayLike,
    *,
    n_neighbors: int = 15,
) -> float:
    """Accuracy on ``test_idx`` of a k-nearest-neighbour classifier fitted on ``train_idx`` cells.

    A measure of how much of ``labels`` an embedding carries: a
    :class:`~sklearn.neighbors.KNeighborsClassifier` (Euclidean distance, majority vote; a tied vote
    goes to the label that sorts first). Cells without a label (NaN / None) are left out of both
    sets. The training cells are fitted in increasing index order, so the accuracy does not depend
    on the order of ``train_idx``; among neighbours at equal distance, scikit-learn's search picks
    from the cells in that order.

    Parameters
    ----------
    embedding
        Cells x dimensions: an array, a :class:`pandas.DataFrame`, a list of rows or a scipy
        sparse matrix.
    labels
        Label of each cell: strings, integers, floats or booleans.
    train_idx, test_idx
        Integer positions (or boolean masks) of the training and test cells.
    n_neighbors
        Neighbours of each test cell (at most the labelled training cells).

    Returns
    -------
    The share of labelled test cells whose predicted label is their label.

    Raises
    ------
    ValueError
        Where ``train_idx`` and ``test_idx`` share cells (a test cell would find itself).
    """
    codes, _ = _label_codes(labels)
    embedding = _cells_matrix(embedding, len(codes), "embedding")
    train_idx = np.sort(_labelled(cell_positions(train_idx, len(codes), "train_idx"), codes, "train_idx"))
    test_idx = _labelled(cell_positions(test_idx, len(codes), "test_idx"), codes, "test_idx")
    _check_disjoint(train_idx, test_idx)
    knn = KNeighborsClassifier(n_neighbors=min(n_neighbors, len(train_idx)))
    knn.fit(embedding[train_idx], codes[train_idx])
    return float((knn.predict(embedding[test_idx]) == codes[test_idx]).mean())


def logistic_regression_baseline(
    features: ArrayLike | sp.spmatrix,
    labels: ArrayLike,
    train_idx: ArrayLike,
    test_idx: ArrayLike,
    *,
    max_iter: int = 2000,
) -> np.ndarray:
    """Predicted labels of ``test_idx`` from a logistic regression fitted on ``train_idx``.

    Use with :func:`log1p_normalise` counts of all genes: often the strongest simple baseline of
    cell annotation. Training cells without a label (NaN / None) are left out; every test cell
    gets a prediction.

    Parameters
    ----------
    features
        Cells x features: an array, a :class:`pandas.DataFrame`, a list of rows or a scipy sparse
        matrix (kept sparse).
    labels
        Label of each cell: strings, integers, floats or booleans.
    train_idx, test_idx
        Integer positions (or boolean masks) of the training and test cells.
    max_iter
        Iterations of :class:`~sklearn.linear_model.LogisticRegression`.

    Returns
    -------
    The predicted label of each ``test_idx`` cell, in that order: an object array of the values of
    ``labels``.

    Raises
    ------
    ValueError
        Where ``train_idx`` and ``test_idx`` share cells (to predict every cell, fit on other cells:
        e.g. a model's ``train_indices`` and its validation and test cells).
    """
    codes, classes = _label_codes(labels)
    features = _cells_matrix(features, len(codes), "features")
    train_idx = _labelled(cell_positions(train_idx, len(codes), "train_idx"), codes, "train_idx")
    test_idx = cell_positions(test_idx, len(codes), "test_idx")
    _check_disjoint(train_idx, test_idx)
    clf = LogisticRegression(max_iter=max_iter)
    clf.fit(features[train_idx], codes[train_idx])
    return classes[clf.predict(features[test_idx])]
