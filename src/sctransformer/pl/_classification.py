"""Confusion matrix and reliability diagram of predicted labels."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix

from sctransformer.metrics._classification import _bin_index, _obs_column, expected_calibration_error

from ._utils import finish, new_axes


def _ordered_labels(column: pd.Series, values: np.ndarray) -> list:
    """Labels present in ``values``: in category order for a categorical column, else sorted."""
    present = pd.unique(values[~pd.isna(values)])
    if isinstance(column.dtype, pd.CategoricalDtype):
        present = set(present)
        return [c for c in column.cat.categories if c in present]
    try:
        return sorted(present)
    except TypeError:
        return list(present)


def confusion_matrix(
    adata: AnnData,
    true_key: str,
    pred_key: str,
    *,
    normalize: Literal["true", "pred", "all"] | None = "true",
    annotate: bool = True,
    cmap: str = "Reds",
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | Axes | None:
    """Heatmap of the confusion matrix of true and predicted labels.

    Rows are the true labels and columns the predicted ones
    (:func:`sklearn.metrics.confusion_matrix`). Both keep the order of the categories where the
    columns are categorical (else sorted); predicted labels that no cell truly has, such as
    ``"unknown"``, get their own columns after the true labels. Cells without a true label are
    left out. ``adata`` is not modified.

    Parameters
    ----------
    adata
        AnnData with both columns in ``.obs``.
    true_key
        ``.obs`` column of the true labels.
    pred_key
        ``.obs`` column of the predicted labels, e.g. ``"sct_cell_type"`` written by
        :func:`sctransformer.tl.predict`.
    normalize
        Divide by the true cells of each row (``"true"``: recall on the diagonal), the predicted
        cells of each column (``"pred"``: precision on the diagonal) or all cells (``"all"``);
        ``None`` shows counts.
    annotate
        Write the value in each square.
    cmap
        Matplotlib colormap.
    ax, show, return_fig
        As in scanpy: a Figure if ``return_fig``, nothing when shown, else the Axes.

    Returns
    -------
    As above.
    """
    if normalize not in ("true", "pred", "all", None):
        raise ValueError(f"normalize must be 'true', 'pred', 'all' or None, got {normalize!r}")
    true_column = _obs_column(adata, true_key, "true_key")
    pred_column = _obs_column(adata, pred_key, "pred_key")
    y_true = true_column.to_numpy(dtype=object)
    y_pred = pred_column.to_numpy(dtype=object)
    keep = ~pd.isna(y_true)
    y_true, y_pred = y_true[keep], y_pred[keep]
    if len(y_true) == 0:
        raise ValueError(f"no cell has a label in adata.obs[{true_key!r}]; nothing to plot")
    rows = _ordered_labels(true_column, y_true)
    in_rows = set(rows)
    columns = rows + [label for label in _ordered_labels(pred_column, y_pred) if label not in in_rows]
    missing = pd.isna(y_pred)
    if missing.any():  # cells without a prediction: a column of their own
        y_pred[missing] = "NA"
        columns += [] if "NA" in columns else ["NA"]
    index = pd.Index(columns, dtype=object)
    matrix = sklearn_confusion_matrix(
        index.get_indexer(y_true),
        index.get_indexer(y_pred),
        labels=np.arange(len(columns)),
        normalize=normalize,
    )[: len(rows)]

    fig, ax = new_axes(ax, (0.45 * len(columns) + 2.5, 0.45 * len(rows) + 1.5))
    image = ax.imshow(matrix, cmap=cmap, vmin=0, vmax=1 if normalize in ("true", "pred") else None)
    ax.set_xticks(np.arange(len(columns)), [str(c) for c in columns], rotation=90)
    ax.set_yticks(np.arange(len(rows)), [str(r) for r in rows])
    ax.set_xlabel(f"predicted ({pred_key})")
    ax.set_ylabel(f"true ({true_key})")
    ax.grid(False)
    label = {"true": "share of true cells", "pred": "share of predicted cells", "all": "share of cells"}
    fig.colorbar(image, ax=ax, label=label.get(normalize, "cells"), shrink=0.8)
    if annotate:
        threshold = (np.nanmax(matrix) if matrix.size else 0) / 2
        for (i, j), value in np.ndenumerate(matrix):
            text = f"{value:.2f}" if normalize else f"{int(value)}"
            color = "white" if value > threshold else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize="x-small", color=color)
    return finish(fig, ax, show=show, return_fig=return_fig)


def calibration(
    adata: AnnData,
    true_key: str,
    pred_key: str,
    *,
    confidence_key: str | None = None,
    n_bins: int = 10,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | Axes | None:
    """Reliability diagram: accuracy of the predictions per confidence bin.

    Bars show the share of correct predictions in each of ``n_bins`` equal-width confidence bins,
    faint bars the share of cells in each bin, and the dashed diagonal perfect calibration. The
    title gives the expected calibration error (:func:`sctransformer.metrics.expected_calibration_error`
    with the same bins). Cells without a true label or without a confidence are left out. ``adata``
    is not modified.

    Parameters
    ----------
    adata
        AnnData with the three columns in ``.obs``.
    true_key
        ``.obs`` column of the true labels.
    pred_key
        ``.obs`` column of the predicted labels, e.g. ``"sct_cell_type"`` written by
        :func:`sctransformer.tl.predict`.
    confidence_key
        ``.obs`` column of the confidence of each prediction; default ``f"{pred_key}_confidence"``.
    n_bins
        Confidence bins.
    ax, show, return_fig
        As in scanpy: a Figure if ``return_fig``, nothing when shown, else the Axes.

    Returns
    -------
    As above.
    """
    if confidence_key is None:
        confidence_key = f"{pred_key}_confidence"
    y_true = _obs_column(adata, true_key, "true_key").to_numpy(dtype=object)
    y_pred = _obs_column(adata, pred_key, "pred_key").to_numpy(dtype=object)
    if confidence_key not in adata.obs.columns:
        raise KeyError(
            f"confidence_key={confidence_key!r} is not a column of adata.obs; run "
            "sct.tl.predict(adata, model) or pass confidence_key="
        )
    confidence = adata.obs[confidence_key].to_numpy(dtype=np.float64)
    keep = ~pd.isna(y_true) & ~np.isnan(confidence)
    if not keep.any():
        raise ValueError(
            f"no cell has both a label in adata.obs[{true_key!r}] and a confidence; nothing to plot"
        )
    confidence, correct = confidence[keep], y_true[keep] == y_pred[keep]
    ece = expected_calibration_error(confidence, correct, n_bins=n_bins)

    bins = _bin_index(confidence, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    n_correct = np.bincount(bins, weights=correct.astype(np.float64), minlength=n_bins)
    accuracy = np.divide(n_correct, count, out=np.full(n_bins, np.nan), where=count > 0)
    width = 1.0 / n_bins
    centers = (np.arange(n_bins) + 0.5) * width

    fig, ax = new_axes(ax, (4.0, 4.0))
    filled = count > 0
    ax.bar(
        centers[filled],
        accuracy[filled],
        width=width,
        edgecolor="black",
        linewidth=0.5,
        alpha=0.7,
        label="accuracy",
    )
    ax.bar(  # in front of the accuracy bars, faint
        centers, count / count.sum(), width=0.5 * width, color="dimgrey", alpha=0.5, label="share of cells"
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="black", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"confidence ({confidence_key})")
    ax.set_ylabel("accuracy")
    ax.set_title(f"ECE = {ece:.3f}")
    ax.legend(loc="upper left", fontsize="small", frameon=False)
    return finish(fig, ax, show=show, return_fig=return_fig)
