"""Classification metrics with bootstrap confidence intervals, and the calibration error."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from sctransformer.data._fields import category_codes, observed_categories
from sctransformer.data._validation import positive_int

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

#: Resamples drawn at once in the bootstrap: bounds the memory to about this many cell indices
#: (and confusion-matrix entries).
_CHUNK_CELLS = 4_000_000

#: Default number of confidence bins of the calibration error: of :func:`expected_calibration_error`
#: and :func:`sctransformer.pl.calibration`, as in :meth:`sctransformer.GeneTransformer.calibrate`.
N_CALIBRATION_BINS = 15

SUMMARY_COLUMNS = ["value", "ci_low", "ci_high", "t_low", "t_high", "binomial_low", "binomial_high"]
PER_CLASS_COLUMNS = ["precision", "recall", "f1", "support", "f1_ci_low", "f1_ci_high"]


def _bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Index of the equal-width bin of [0, 1] of each confidence: bins ``(lo, hi]``, 0 in the first.

    The inner edges are ``k / n_bins`` (``k = 1 .. n_bins - 1``) as floating-point division gives
    them, so a confidence written as ``k / n_bins`` lies in the bin it closes. (The edges of
    :func:`numpy.linspace` are ``k * (1 / n_bins)``, which for some ``n_bins``, e.g. 6, 7, 9 and 12,
    differ from ``k / n_bins`` in the last bit and put such a confidence one bin off.)
    """
    edges = np.arange(1, n_bins) / n_bins
    return np.searchsorted(edges, confidence, side="left")


def _check_confidence(confidence, correct, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct)
    if confidence.ndim != 1 or correct.ndim != 1:
        raise ValueError(
            f"confidence and correct must be 1-D, got shapes {confidence.shape} and {correct.shape}"
        )
    if len(confidence) != len(correct):
        raise ValueError(
            f"confidence ({len(confidence)}) and correct ({len(correct)}) must have one value per cell"
        )
    if len(confidence) == 0:
        raise ValueError("confidence is empty; pass at least one cell")
    if not np.all(np.isfinite(confidence)) or confidence.min() < -1e-9 or confidence.max() > 1 + 1e-9:
        raise ValueError("confidence must hold finite values in [0, 1]; drop cells without a prediction")
    confidence = np.clip(confidence, 0.0, 1.0)  # rounding error of a softmax
    missing = _is_missing(correct)
    if missing.any():
        raise ValueError(
            f"correct is missing (None / NaN / pd.NA) for {int(missing.sum())} of {len(correct)} cells; "
            "drop the cells whose true label or prediction is unknown, or pass booleans"
        )
    if correct.dtype != bool:
        if not np.all(np.isin(correct, [0, 1])):
            raise ValueError("correct must hold booleans or 0/1 (is the prediction right?)")
        correct = correct.astype(bool)
    n_bins = positive_int(n_bins, "n_bins")
    return confidence, correct


def expected_calibration_error(confidence, correct, *, n_bins: int = N_CALIBRATION_BINS) -> float:
    r"""Expected calibration error (ECE) of predictions with a confidence.

    The cells are grouped into ``n_bins`` equal-width bins of [0, 1] by confidence (bins
    ``(lo, hi]``, a confidence of 0 in the first) and

    .. math:: \mathrm{ECE} = \sum_b \frac{n_b}{n} \left| \mathrm{acc}_b - \mathrm{conf}_b \right|,

    where :math:`\mathrm{acc}_b` and :math:`\mathrm{conf}_b` are the share of correct predictions
    and the mean confidence of the :math:`n_b` cells of bin :math:`b` (Guo et al., 2017).

    Parameters
    ----------
    confidence
        Confidence of each prediction (e.g. the probability of the predicted label), in [0, 1].
    correct
        Whether each prediction is right (booleans or 0/1).
    n_bins
        Number of bins.

    Returns
    -------
    The ECE, in [0, 1]: 0 for a perfectly calibrated classifier.

    Examples
    --------
    >>> import numpy as np
    >>> from sctransformer.metrics import expected_calibration_error
    >>> round(expected_calibration_error(np.array([0.9, 0.9, 0.6, 0.6]), np.array([1, 1, 1, 0])), 3)
    0.1
    """
    confidence, correct = _check_confidence(confidence, correct, n_bins)
    bins = _bin_index(confidence, n_bins)
    gap = np.bincount(bins, weights=correct.astype(np.float64) - confidence, minlength=n_bins)
    return float(np.abs(gap).sum() / len(confidence))


@dataclass(repr=False)
class ClassificationReport:
    """Accuracy and macro-F1 of a classifier with confidence intervals, and per-class scores.

    Returned by :func:`classification_scores` and :func:`classification_report`.

    Attributes
    ----------
    summary
        Index ``["accuracy", "macro_f1"]``; columns ``value`` (point estimate), ``ci_low`` /
        ``ci_high`` (bootstrap percentile interval), ``t_low`` / ``t_high`` (bootstrap t-interval:
        value ± t quantile × bootstrap standard deviation; not clipped to [0, 1]) and
        ``binomial_low`` / ``binomial_high`` (exact Clopper–Pearson interval; accuracy only).
    per_class
        Index = the labels; columns ``precision``, ``recall``, ``f1``, ``support`` (true cells of
        the label) and ``f1_ci_low`` / ``f1_ci_high`` (bootstrap percentile interval of the F1).
    n_cells
        Cells scored (those with a true label).
    confidence_level
        Confidence level of the intervals.
    n_bootstrap
        Bootstrap resamples; 0 when the bootstrap was skipped (its columns are then NaN).
    """

    summary: pd.DataFrame
    per_class: pd.DataFrame
    n_cells: int
    confidence_level: float
    n_bootstrap: int

    def format(
        self,
        metric: Literal["accuracy", "macro_f1"] = "macro_f1",
        *,
        interval: Literal["percentile", "t", "binomial"] = "percentile",
        digits: int = 3,
    ) -> str:
        """A metric with its interval as text, e.g. ``"0.712 [0.681, 0.744]"``.

        Parameters
        ----------
        metric
            Row of :attr:`summary`.
        interval
            Which interval: bootstrap percentile, bootstrap t or binomial (accuracy only).
        digits
            Decimals.

        Returns
        -------
        The value and its interval; the value alone where the interval is not available.
        """
        if metric not in self.summary.index:
            raise ValueError(f"metric must be one of {list(self.summary.index)}, got {metric!r}")
        prefix = {"percentile": "ci", "t": "t", "binomial": "binomial"}.get(interval)
        if prefix is None:
            raise ValueError(f"interval must be 'percentile', 't' or 'binomial', got {interval!r}")
        row = self.summary.loc[metric]
        low, high = row[f"{prefix}_low"], row[f"{prefix}_high"]
        text = f"{row['value']:.{digits}f}"
        if np.isnan(low) or np.isnan(high):
            return text
        return f"{text} [{low:.{digits}f}, {high:.{digits}f}]"

    def __str__(self) -> str:
        level = f"{self.confidence_level:.0%}"
        bootstrap = f"{self.n_bootstrap} bootstrap resamples" if self.n_bootstrap else "no bootstrap"
        with pd.option_context("display.width", 110, "display.max_columns", None):
            return (
                f"ClassificationReport: {self.n_cells} cells, {level} intervals, {bootstrap}\n"
                f"{self.summary.round(4).to_string()}\n\n{self.per_class.round(4).to_string()}"
            )

    def __repr__(self) -> str:
        return str(self)


def _is_missing(values: np.ndarray) -> np.ndarray:
    return np.asarray(pd.isna(values), dtype=bool)


def _as_labels(values, name: str) -> np.ndarray:
    # object dtype: np.asarray of a list mixing strings and NaN would turn the NaN into the string "nan"
    values = np.asarray(values, dtype=object)
    if values.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per cell), got shape {values.shape}")
    return values


def _default_labels(y_true: np.ndarray) -> list:
    unique = list(pd.unique(y_true))
    try:
        return sorted(unique)
    except TypeError:  # labels of mixed types: keep the order of first appearance
        return unique


def _encode(y_true: np.ndarray, y_pred: np.ndarray, labels: list) -> tuple[np.ndarray, np.ndarray, int]:
    """Integer codes: ``labels`` are 0 .. L-1, every other value (incl. missing) L, L+1, ...

    Missing values of every kind (``None``, NaN, ``pd.NaT``, ``pd.NA``) are one value, ``None``:
    an index of two kinds of missing value is not unique to :meth:`pandas.Index.get_indexer`.
    """
    y_true, y_pred = (
        np.where(_is_missing(values), None, values).astype(object) for values in (y_true, y_pred)
    )
    index = pd.Index(labels, dtype=object)
    true_codes = index.get_indexer(y_true.astype(object))
    pred_codes = index.get_indexer(y_pred.astype(object))
    other = pd.Index(
        pd.unique(np.concatenate([y_true[true_codes < 0], y_pred[pred_codes < 0]]).astype(object))
    )
    for codes, values in ((true_codes, y_true), (pred_codes, y_pred)):
        outside = codes < 0
        codes[outside] = len(index) + other.get_indexer(values[outside].astype(object))
    return true_codes, pred_codes, len(index) + len(other)


def _scores_from_confusion(
    confusion: np.ndarray, n_labels: int, averaged: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Scores of stacked confusion matrices ``(..., K, K)`` (rows true, columns predicted).

    Macro-F1 averages the F1 of the first ``n_labels`` labels, except those marked ``True`` in
    ``averaged`` that have neither true nor predicted cells in a matrix: a bootstrap resample
    that happens to draw no cell of a rare class must not score that class's F1 as 0 (its
    per-class F1 is NaN there).
    """
    diagonal = np.diagonal(confusion, axis1=-2, axis2=-1)
    n = confusion.sum(axis=(-2, -1))
    true_total = confusion.sum(axis=-1)[..., :n_labels]
    pred_total = confusion.sum(axis=-2)[..., :n_labels]
    tp = diagonal[..., :n_labels].astype(np.float64)

    def ratio(num, den):
        return np.divide(num, den, out=np.zeros_like(num), where=den > 0)  # zero_division=0

    f1 = ratio(2 * tp, (true_total + pred_total).astype(np.float64))
    if averaged is None:
        macro_f1 = f1.mean(axis=-1)
    else:
        counted = ~(averaged & (true_total + pred_total == 0))
        macro_f1 = (f1 * counted).sum(axis=-1) / counted.sum(axis=-1).clip(min=1)
        f1 = np.where(counted, f1, np.nan)  # a class absent from a resample has no F1 there
    return {
        "accuracy": diagonal.sum(axis=-1) / n,
        "macro_f1": macro_f1,
        "precision": ratio(tp, pred_total.astype(np.float64)),
        "recall": ratio(tp, true_total.astype(np.float64)),
        "f1": f1,
    }


def _bootstrap_scores(
    true_codes: np.ndarray,
    pred_codes: np.ndarray,
    n_classes: int,
    n_labels: int,
    n_bootstrap: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Scores of ``n_bootstrap`` resamples of the cells.

    Macro-F1 of a resample averages the labels the point estimate averages, less those that
    occur among the cells (truly or predicted) but not in the resample; labels that occur nowhere
    count 0 in both, as in :func:`sklearn.metrics.f1_score` with ``zero_division=0``.

    Resample ``b`` takes the cells ``rng.integers(0, n, size=(n_bootstrap, n))[b]`` (drawn in
    chunks of rows, which gives the same numbers); its confusion matrix comes from one
    :func:`numpy.bincount` over the codes of the (true, predicted) pairs.
    """
    n = len(true_codes)
    occurring = np.zeros(n_labels, dtype=bool)
    for codes in (true_codes, pred_codes):
        occurring[codes[codes < n_labels]] = True
    pair = true_codes * n_classes + pred_codes
    size = n_classes * n_classes
    chunk = max(1, _CHUNK_CELLS // max(n, size))
    parts = []
    for start in range(0, n_bootstrap, chunk):
        rows = min(chunk, n_bootstrap - start)
        cells = rng.integers(0, n, size=(rows, n))
        offset = np.arange(rows)[:, None] * size
        counts = np.bincount((pair[cells] + offset).ravel(), minlength=rows * size)
        confusion = counts.reshape(rows, n_classes, n_classes)
        parts.append(_scores_from_confusion(confusion, n_labels, averaged=occurring))
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def classification_scores(
    y_true,
    y_pred,
    *,
    labels: Sequence | None = None,
    n_bootstrap: int = 1000,
    confidence_level: float = 0.95,
    seed: int = 0,
) -> ClassificationReport:
    r"""Accuracy and macro-F1 of predicted labels, with bootstrap and binomial confidence intervals.

    Cells whose true label is missing (``None`` / NaN) are dropped. Accuracy counts the cells whose
    prediction equals their true label; a prediction outside ``labels`` (e.g. ``"unknown"``) or
    missing is wrong for every cell whose true label is in ``labels``.

    Point estimates come from :func:`sklearn.metrics.accuracy_score`,
    :func:`sklearn.metrics.f1_score` (``average="macro"``, ``zero_division=0``) and
    :func:`sklearn.metrics.precision_recall_fscore_support`. The intervals of accuracy and
    macro-F1 come from ``n_bootstrap`` resamples of the cells with replacement: the percentile
    interval and the t-interval (value ± :math:`t_{(1+c)/2,\,B-1}` × bootstrap standard
    deviation); accuracy also gets the exact Clopper–Pearson interval of
    :meth:`scipy.stats.binomtest`. The bootstrap treats cells as independent, so it understates the
    uncertainty when cells are grouped (donors, batches).

    Parameters
    ----------
    y_true
        True label of each cell.
    y_pred
        Predicted label of each cell.
    labels
        Labels to score and average into macro-F1 (a single ``str`` is one label); default the
        sorted unique true labels, so a class that no cell truly has is not averaged in.
    n_bootstrap
        Bootstrap resamples; 0 skips the bootstrap (its columns are then NaN).
    confidence_level
        Confidence level of the intervals, in (0, 1).
    seed
        Seed of :func:`numpy.random.default_rng` for the resamples.

    Returns
    -------
    :class:`ClassificationReport` with ``summary`` (accuracy, macro-F1 and their intervals) and
    ``per_class`` (precision, recall, F1, support, F1 interval per label).

    Examples
    --------
    >>> from sctransformer.metrics import classification_scores
    >>> report = classification_scores(["a", "a", "b", "b"], ["a", "b", "b", "b"], n_bootstrap=200)
    >>> float(report.summary.loc["accuracy", "value"])
    0.75
    """
    y_true, y_pred = _as_labels(y_true, "y_true"), _as_labels(y_pred, "y_pred")
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true ({len(y_true)}) and y_pred ({len(y_pred)}) must have one label per cell")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int | np.integer) or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be a non-negative integer, got {n_bootstrap!r}")
    if n_bootstrap == 1:
        raise ValueError("n_bootstrap=1 gives no interval; pass 0 to skip the bootstrap or at least 2")
    if not 0 < confidence_level < 1:
        raise ValueError(f"confidence_level must lie in (0, 1), e.g. 0.95, got {confidence_level!r}")
    keep = ~_is_missing(y_true)
    y_true, y_pred = y_true[keep], y_pred[keep]
    n = len(y_true)
    if n == 0:
        raise ValueError("no cell has a true label (all missing or no cells); nothing to score")
    if labels is None:
        labels = _default_labels(y_true)
    else:
        labels = [labels] if isinstance(labels, str) else list(labels)
        if len(labels) == 0:
            raise ValueError("labels is empty; pass the labels to score or None for the true ones")
        if _is_missing(np.asarray(labels, dtype=object)).any():
            raise ValueError("labels must not contain missing values (None / NaN)")
        if len(set(labels)) != len(labels):
            raise ValueError("labels contains duplicates; pass each label once")

    true_codes, pred_codes, n_classes = _encode(y_true, y_pred, labels)
    n_labels = len(labels)
    label_codes = np.arange(n_labels)
    accuracy = accuracy_score(true_codes, pred_codes)
    macro_f1 = f1_score(true_codes, pred_codes, labels=label_codes, average="macro", zero_division=0)
    precision, recall, f1, support = precision_recall_fscore_support(
        true_codes, pred_codes, labels=label_codes, zero_division=0
    )

    summary = pd.DataFrame(np.nan, index=["accuracy", "macro_f1"], columns=SUMMARY_COLUMNS)
    summary["value"] = [accuracy, macro_f1]
    per_class = pd.DataFrame(
        {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(int)},
        index=pd.Index(labels, name="label"),
    )
    per_class["f1_ci_low"] = np.nan
    per_class["f1_ci_high"] = np.nan

    if n_bootstrap:
        scores = _bootstrap_scores(
            true_codes, pred_codes, n_classes, n_labels, n_bootstrap, np.random.default_rng(seed)
        )
        quantiles = [(1 - confidence_level) / 2, (1 + confidence_level) / 2]
        t_value = stats.t.ppf((1 + confidence_level) / 2, n_bootstrap - 1)
        for metric in ("accuracy", "macro_f1"):
            values = scores[metric]
            point = summary.loc[metric, "value"]
            half_width = t_value * values.std(ddof=1)
            summary.loc[metric, ["ci_low", "ci_high"]] = np.quantile(values, quantiles)
            summary.loc[metric, ["t_low", "t_high"]] = [point - half_width, point + half_width]
        with warnings.catch_warnings():  # a class drawn in no resample: its interval stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            per_class[["f1_ci_low", "f1_ci_high"]] = np.nanquantile(scores["f1"], quantiles, axis=0).T

    n_correct = int((true_codes == pred_codes).sum())
    binomial = stats.binomtest(n_correct, n).proportion_ci(confidence_level, method="exact")
    summary.loc["accuracy", ["binomial_low", "binomial_high"]] = [binomial.low, binomial.high]
    return ClassificationReport(
        summary=summary,
        per_class=per_class,
        n_cells=n,
        confidence_level=float(confidence_level),
        n_bootstrap=int(n_bootstrap),
    )


def _obs_column(adata: AnnData, key: str, argument: str) -> pd.Series:
    if key not in adata.obs.columns:
        available = list(map(str, adata.obs.columns))
        shown = ", ".join(available[:10]) + (", ..." if len(available) > 10 else "")
        raise KeyError(f"{argument}={key!r} is not a column of adata.obs; available: {shown or 'none'}")
    return adata.obs[key]


def _model_labels(column: pd.Series, predicted: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Labels of a column as the model encodes them, and their order.

    The model stores the categories of a phenotype as strings
    (:func:`~sctransformer.data.observed_categories`), so :func:`sctransformer.tl.predict` writes
    ``"0"``, ``"1"`` for a column of integers ``0``, ``1``; true and predicted labels are compared
    after the same conversion (:func:`~sctransformer.data.category_codes`). With ``predicted``, a
    value takes the name of the predicted label it matches as registration matches a model's
    categories (integers that a missing value made float, ``0.0``, match ``"0"``, and integers
    match the float names ``"0.0"``).

    Parameters
    ----------
    column
        Labels of each cell (``.obs`` column, or the labels to score).
    predicted
        Names of the predicted labels.

    Returns
    -------
    Each cell's label as a string (``None`` where missing) and the order of the labels: a
    categorical column's categories (unused ones dropped), else sorted.
    """
    column = column if isinstance(column, pd.Series) else pd.Series(column)
    categories = observed_categories(column)
    codes = category_codes(column, categories)
    if predicted is not None:  # each category's cells share a value, so a name per category
        predicted = list(dict.fromkeys(predicted))
        matched = category_codes(column, predicted)
        first = np.unique(codes[codes >= 0], return_index=True)[1]
        named = [
            predicted[m] if m >= 0 else c for m, c in zip(matched[codes >= 0][first], categories, strict=True)
        ]
        if named != categories:
            categories = named if isinstance(column.dtype, pd.CategoricalDtype) else sorted(named)
            return np.asarray([*named, None], dtype=object)[codes], categories
    return np.asarray([*categories, None], dtype=object)[codes], categories  # code -1: the last, None


def _warn_if_disjoint(y_true: np.ndarray, y_pred: np.ndarray, true_key: str, pred_key: str) -> None:
    """Warn where no cell's predicted label is any true label: every prediction then counts as wrong."""
    true_labels = set(y_true[~_is_missing(y_true)])
    predicted = set(y_pred[~_is_missing(y_true) & ~_is_missing(y_pred)])
    if not true_labels or not predicted or not true_labels.isdisjoint(predicted):
        return

    def some(labels: set) -> str:
        shown = sorted(map(repr, labels))
        return ", ".join(shown[:5]) + (", ..." if len(shown) > 5 else "")

    warnings.warn(
        f"none of the predicted labels in adata.obs[{pred_key!r}] ({some(predicted)}) is a true label "
        f"of adata.obs[{true_key!r}] ({some(true_labels)}), so every prediction counts as wrong. Check "
        f"that {pred_key!r} predicts {true_key!r}; if the two columns write the same labels differently "
        "(e.g. 1 and '1.0'), rename the labels of one to those of the other before scoring, e.g. "
        f"adata.obs[{true_key!r}] = adata.obs[{true_key!r}].map({{true_label: predicted_label, ...}})",
        UserWarning,
        stacklevel=3,
    )


def classification_report(
    adata: AnnData,
    true_key: str,
    pred_key: str,
    *,
    labels: Sequence | None = None,
    n_bootstrap: int = 1000,
    confidence_level: float = 0.95,
    seed: int = 0,
) -> ClassificationReport:
    """:func:`classification_scores` of two ``.obs`` columns (true and predicted labels).

    Labels are compared as the model encodes them: every present value as a string (a true
    label ``0`` matches the prediction ``"0"`` that :func:`sctransformer.tl.predict` writes for
    a column of integers), missing values stay missing; so are ``labels``, and the labels of
    :attr:`ClassificationReport.per_class` are strings. Integers that a missing value made float
    (``0.0``, ``1.0``) match the predictions ``"0"``, ``"1"`` where the predictions are so named.
    Warns where no predicted label is a true label (e.g. the columns write the labels differently),
    as every prediction then counts as wrong. ``adata`` is not modified.

    Parameters
    ----------
    adata
        AnnData with both columns in ``.obs``.
    true_key
        ``.obs`` column of the true labels; cells where it is missing are dropped.
    pred_key
        ``.obs`` column of the predicted labels, e.g. ``"sct_cell_type"`` written by
        :func:`sctransformer.tl.predict`.
    labels, n_bootstrap, confidence_level, seed
        As in :func:`classification_scores`.

    Returns
    -------
    :class:`ClassificationReport`.

    Examples
    --------
    >>> report = sct.metrics.classification_report(adata, "cell_type", "sct_cell_type")  # doctest: +SKIP
    >>> report.format("macro_f1")  # doctest: +SKIP
    '0.712 [0.681, 0.744]'
    """
    true_column = _obs_column(adata, true_key, "true_key")
    y_pred, pred_order = _model_labels(_obs_column(adata, pred_key, "pred_key"))
    y_true, _ = _model_labels(true_column, pred_order)
    _warn_if_disjoint(y_true, y_pred, true_key, pred_key)
    return classification_scores(
        y_true,
        y_pred,
        labels=None
        if labels is None
        else list(_model_labels([labels] if isinstance(labels, str) else labels, pred_order)[0]),
        n_bootstrap=n_bootstrap,
        confidence_level=confidence_level,
        seed=seed,
    )
