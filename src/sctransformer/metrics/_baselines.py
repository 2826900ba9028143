"""The simple baselines of cell annotation that a transformer must be compared with."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from sctransformer.data._validation import cell_positions, positive_int

from ._probes import _check_disjoint, _label_codes, log1p_normalise

if TYPE_CHECKING:
    from collections.abc import Sequence

Baseline = Literal["logreg_all_genes", "logreg_hvg", "logreg_pca", "knn_pca"]
BASELINES: tuple[str, ...] = ("logreg_all_genes", "logreg_hvg", "logreg_pca", "knn_pca")


def _select_highly_variable(x_train, n_top_genes: int) -> np.ndarray:
    """Indices (ascending) of the ``n_top_genes`` genes of highest normalised dispersion.

    Scanpy's ``flavor="seurat"`` on log1p-normalised training cells; all genes when there are no
    more than ``n_top_genes``. Genes are ranked by scanpy's ``dispersions_norm`` (genes constant
    on the training cells last), so exactly ``n_top_genes`` are kept even with ties.
    """
    n_genes = x_train.shape[1]
    if n_genes <= n_top_genes:
        return np.arange(n_genes)
    table = sc.pp.highly_variable_genes(
        AnnData(x_train), flavor="seurat", n_top_genes=n_top_genes, inplace=False
    )
    dispersion = np.nan_to_num(table["dispersions_norm"].to_numpy(dtype=np.float64), nan=-np.inf)
    return np.sort(np.argsort(-dispersion, kind="stable")[:n_top_genes])


def annotation_baselines(
    counts,
    labels,
    train_idx,
    test_idx,
    *,
    n_top_genes: int = 2000,
    n_pcs: int = 50,
    n_neighbors: int = 15,
    seed: int = 0,
    methods: Sequence[Baseline] | None = None,
) -> dict[str, np.ndarray]:
    """Predicted labels of the test cells from the simple baselines of cell annotation.

    Every baseline is fitted on the training cells only (gene selection, scaling and PCA
    included); normalisation is per cell, so it leaks nothing between the two sets. The training
    cells are taken in increasing index order, so the predictions do not depend on the order of
    ``train_idx`` (the rounding of the fits, and which of several equidistant neighbours
    ``"knn_pca"`` takes, would).

    ``"logreg_all_genes"``
        :class:`~sklearn.linear_model.LogisticRegression` (``max_iter=2000``) on
        :func:`log1p_normalise` counts of all genes (sparse input stays sparse).
    ``"logreg_hvg"``
        The same on the ``n_top_genes`` highly variable genes of the training cells (scanpy's
        :func:`~scanpy.pp.highly_variable_genes`, ``flavor="seurat"``, on log1p-normalised
        values; all genes where there are fewer).
    ``"logreg_pca"``, ``"knn_pca"``
        :class:`~sklearn.linear_model.LogisticRegression` or
        :class:`~sklearn.neighbors.KNeighborsClassifier` (``n_neighbors``) on the first
        ``n_pcs`` principal components of those genes, each gene scaled to unit variance on the
        training cells. PCA is :class:`sklearn.decomposition.PCA` (``svd_solver="arpack"``),
        which centres the data (implicitly for sparse input, so it stays sparse); unlike
        :func:`scanpy.pp.scale` the scaled values are not clipped.

    Parameters
    ----------
    counts
        Cells x genes raw counts, dense or scipy sparse.
    labels
        Label of each cell (strings, integers, floats or booleans); those of the training cells
        must not be missing.
    train_idx, test_idx
        Integer indices (or boolean masks) of the training and test cells; they must not overlap.
    n_top_genes
        Highly variable genes of ``"logreg_hvg"`` and of the PCA.
    n_pcs
        Principal components, at most ``min(n_train - 1, n_genes - 1)`` (fewer are used where
        the data have fewer).
    n_neighbors
        Neighbours of ``"knn_pca"`` (at most the training cells); a tied vote goes to the label
        that sorts first.
    seed
        Random state of the PCA and the logistic regressions.
    methods
        Baselines to run, a subset of ``("logreg_all_genes", "logreg_hvg", "logreg_pca",
        "knn_pca")``; default all.

    Returns
    -------
    Predicted labels of the ``test_idx`` cells (in that order; object arrays of the values of
    ``labels``) per baseline name, in the order of ``methods``.

    Examples
    --------
    >>> from sctransformer.metrics import annotation_baselines, classification_scores
    >>> predictions = annotation_baselines(  # doctest: +SKIP
    ...     adata.layers["counts"], adata.obs["cell_type"], train, test
    ... )
    >>> {name: classification_scores(adata.obs["cell_type"].iloc[test], pred).format()  # doctest: +SKIP
    ...  for name, pred in predictions.items()}
    """
    if isinstance(methods, str):
        methods = [methods]
    methods = list(BASELINES if methods is None else dict.fromkeys(methods))
    unknown = [m for m in methods if m not in BASELINES]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {list(BASELINES)}, got {methods!r}")
    n_top_genes = positive_int(n_top_genes, "n_top_genes")
    n_pcs = positive_int(n_pcs, "n_pcs")
    n_neighbors = positive_int(n_neighbors, "n_neighbors")

    if sp.issparse(counts):
        counts = sp.csr_matrix(counts)
    else:
        counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"counts must be a cells x genes matrix, got shape {counts.shape}")
    n_cells = counts.shape[0]
    codes, classes = _label_codes(labels)  # scikit-learn is fitted on codes: labels of any kind
    if codes.shape != (n_cells,):
        raise ValueError(f"labels must have one entry per cell (row of counts: {n_cells}), got {codes.shape}")
    train_idx = np.sort(cell_positions(train_idx, n_cells, "train_idx"))
    test_idx = cell_positions(test_idx, n_cells, "test_idx")
    _check_disjoint(train_idx, test_idx)
    y_train = codes[train_idx]
    if (y_train < 0).any():
        raise ValueError("some training cells have no label; drop them from train_idx")
    if len(np.unique(y_train)) < 2:
        raise ValueError("the training cells carry fewer than two labels; nothing to learn")

    x_train, x_test = counts[train_idx], counts[test_idx]
    for x in (x_train, x_test):
        values = x.data if sp.issparse(x) else x
        if values.size and (not np.all(np.isfinite(values)) or values.min() < 0):
            raise ValueError("counts must be non-negative finite values; pass raw counts")
    x_train, x_test = log1p_normalise(x_train), log1p_normalise(x_test)

    def logreg(train, test) -> np.ndarray:
        model = LogisticRegression(max_iter=2000, random_state=seed)
        return classes[model.fit(train, y_train).predict(test)]

    predictions: dict[str, np.ndarray] = {}
    if "logreg_all_genes" in methods:
        predictions["logreg_all_genes"] = logreg(x_train, x_test)
    if any(m in methods for m in ("logreg_hvg", "logreg_pca", "knn_pca")):
        genes = _select_highly_variable(x_train, n_top_genes)
        hvg_train, hvg_test = x_train[:, genes], x_test[:, genes]
        if "logreg_hvg" in methods:
            predictions["logreg_hvg"] = logreg(hvg_train, hvg_test)
        if "logreg_pca" in methods or "knn_pca" in methods:
            n_components = min(n_pcs, len(train_idx) - 1, len(genes) - 1)
            if n_components < 1:
                raise ValueError("PCA needs at least two training cells and two genes")
            scaler = StandardScaler(with_mean=False).fit(hvg_train)  # PCA centres
            pca = PCA(n_components=n_components, svd_solver="arpack", random_state=seed)
            pcs_train = pca.fit_transform(scaler.transform(hvg_train))
            pcs_test = pca.transform(scaler.transform(hvg_test))
            if "logreg_pca" in methods:
                predictions["logreg_pca"] = logreg(pcs_train, pcs_test)
            if "knn_pca" in methods:
                knn = KNeighborsClassifier(n_neighbors=min(n_neighbors, len(train_idx)))
                predictions["knn_pca"] = classes[knn.fit(pcs_train, y_train).predict(pcs_test)]
    return {name: predictions[name] for name in methods}
