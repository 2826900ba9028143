"""Confusion matrix and reliability diagram of predicted labels."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix

from sctransformer._keys import KEYS
from sctransformer.metrics._classification import (
    N_CALIBRATION_BINS,
    _bin_index,
    _model_labels,
    _obs_column,
    _warn_if_disjoint,
    expected_calibration_error,
)
from sctransformer.tl._predict import probability_labels

from ._utils import finish, new_axes


def _argmax_labels(probabilities: pd.DataFrame, names: list[str] | None = None) -> np.ndarray:
    """Most probable label of each cell; ``None`` where a row is not finite.

    A label is the name of its column in ``names`` (default the column names, as ``str``).
    """
    values = probabilities.to_numpy(dtype=np.float64, na_value=np.nan)
    names = [str(c) for c in probabilities.columns] if names is None else names
    labels = np.asarray([*names, None], dtype=object)
    best = values.argmax(axis=1)
    best[~np.isfinite(values).all(axis=1)] = -1  # the last: None
    return labels[best]


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
    ``"unknown"``, get their own columns after the true labels. Labels are compared as the model
    encodes them: every present value as a string, so a true label ``0`` matches the prediction
    ``"0"`` of a model trained on a column of integers, and integers that a missing value made
    float (``0.0``) match the predictions ``"0"`` where the predictions are so named. Warns where
    no predicted label is a true label. Cells without a true label are left out; cells without a
    prediction get a column ``"NA"`` (``"NA (no prediction)"`` where a label is named ``"NA"``).
    ``adata`` is not modified.

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
    y_pred, pred_order = _model_labels(_obs_column(adata, pred_key, "pred_key"))
    y_true, true_order = _model_labels(_obs_column(adata, true_key, "true_key"), pred_order)
    _warn_if_disjoint(y_true, y_pred, true_key, pred_key)
    keep = ~pd.isna(y_true)
    y_true, y_pred = y_true[keep], y_pred[keep]
    if len(y_true) == 0:
        raise ValueError(f"no cell has a label in adata.obs[{true_key!r}]; nothing to plot")
    present_true, present_pred = set(y_true), set(y_pred)
    rows = [label for label in true_order if label in present_true]
    in_rows = set(rows)
    columns = rows + [label for label in pred_order if label in present_pred and label not in in_rows]
    missing = pd.isna(y_pred)
    if missing.any():  # cells without a prediction: a column of their own, named apart from the labels
        taken = in_rows | present_pred
        no_prediction = "NA" if "NA" not in taken else "NA (no prediction)"
        while no_prediction in taken:
            no_prediction += "_"
        y_pred[missing] = no_prediction
        columns.append(no_prediction)
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
        threshold = (image.norm.vmin + image.norm.vmax) / 2  # the middle of the colour scale drawn
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
    n_bins: int = N_CALIBRATION_BINS,
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

    The confidence is the probability of the most probable label, so that label is the one scored:
    where ``.obsm[f"{pred_key}_probs"]`` (written by :func:`sctransformer.tl.predict`) is present,
    each cell's most probable label is taken from it, which also scores the cells that
    ``min_confidence`` labelled ``"unknown"``; its columns are read as the categories that the run
    record of :func:`~sctransformer.tl.predict` in ``.uns["sct"]`` names (the columns hold names
    that .h5ad can store: ``"_"`` for ``"/"``), or, without that record (e.g. after
    :func:`anndata.concat`), as the true or predicted label with that stored name. Without it, the labels of ``pred_key`` are scored
    and cells labelled ``"unknown"`` are left out (their most probable label is not known).
    Labels are compared as the model encodes them: every present value as a string, so a true
    label ``0`` matches the prediction ``"0"`` of a model trained on a column of integers, and
    integers that a missing value made float (``0.0``) match the predictions ``"0"`` where the
    predictions are so named.

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
        Confidence bins; the default is that of
        :func:`~sctransformer.metrics.expected_calibration_error` and
        :meth:`~sctransformer.GeneTransformer.calibrate`.
    ax, show, return_fig
        As in scanpy: a Figure if ``return_fig``, nothing when shown, else the Axes.

    Returns
    -------
    As above.
    """
    if confidence_key is None:
        confidence_key = f"{pred_key}_confidence"
    true_column = _obs_column(adata, true_key, "true_key")
    pred_column = _obs_column(adata, pred_key, "pred_key")
    y_true, true_order = _model_labels(true_column)
    if confidence_key not in adata.obs.columns:
        raise KeyError(
            f"confidence_key={confidence_key!r} is not a column of adata.obs; run "
            "sct.tl.predict(adata, model) or pass confidence_key="
        )
    confidence = adata.obs[confidence_key].to_numpy(dtype=np.float64)
    y_pred, pred_order = _model_labels(pred_column)
    probabilities = adata.obsm.get(f"{pred_key}_probs")
    keep = ~np.isnan(confidence)
    if isinstance(probabilities, pd.DataFrame) and probabilities.shape[1] > 0:
        names = probability_labels(adata, pred_key, probabilities, labels=[*true_order, *pred_order])
        y_pred = _argmax_labels(probabilities, names)
        pred_order = [*pred_order, *names]
    else:  # "unknown" hides the label whose probability the confidence is
        keep &= y_pred != KEYS.UNKNOWN
    y_true, _ = _model_labels(true_column, pred_order)  # integers made float as the predictions name them
    keep &= ~pd.isna(y_true)
    if not keep.any():
        raise ValueError(
            f"no cell has a label in adata.obs[{true_key!r}], a confidence and a prediction other "
            f"than {KEYS.UNKNOWN!r}; nothing to plot"
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
