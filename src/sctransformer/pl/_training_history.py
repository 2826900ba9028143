"""Loss curves per component, train vs validation."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from sctransformer.data._validation import positive_int

from ._utils import finish

if TYPE_CHECKING:
    from sctransformer.model import GeneTransformer

_STAGES = ("train", "validation")


def training_history(
    model: GeneTransformer,
    *,
    metrics: str | list[str] | None = None,
    ncols: int = 3,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | Axes | list[Axes] | None:
    """Per-epoch curves of each loss component and accuracy, train and validation in one panel.

    Parameters
    ----------
    model
        A trained (or loaded) :class:`~sctransformer.GeneTransformer`.
    metrics
        Metric name(s) without the stage suffix (``"loss"``, ``"expression"``,
        ``"phenotype_cell_type_accuracy"``, ...): one name or a list; default all that were logged.
    ncols
        Panels per row (a positive integer).
    ax
        Axes to draw a single metric into (requires exactly one metric); its figure's layout is
        left as it is. Default a new figure, laid out tight.
    show, return_fig
        As in scanpy: a Figure if ``return_fig``, nothing when shown, else the Axes.

    Returns
    -------
    The Figure if ``return_fig``; ``None`` when shown; else the list of Axes (the one Axes when
    ``ax`` was given).
    """
    ncols = positive_int(ncols, "ncols")
    history = model.history
    available = sorted({name.rsplit("_", 1)[0] for name in history if name.rsplit("_", 1)[-1] in _STAGES})
    available.sort(key=lambda name: (name != "loss", "accuracy" in name, name))
    if not available:
        if model.is_trained_:
            raise ValueError(
                "the model recorded no training curves (it was trained without a logger, e.g. with "
                "logger=False); train it with the default logger to record them"
            )
        raise ValueError("the model has no training history; train it first")
    if metrics is None:
        metrics = available
    elif isinstance(metrics, str):
        metrics = [metrics]
    else:
        metrics = list(metrics)
    if not metrics:
        raise ValueError(f"metrics is empty; pass one or more of {available}, or None for all")
    unknown = [m for m in metrics if m not in available]
    if unknown:
        raise KeyError(f"metrics {unknown} were not logged; available: {available}")
    if ax is not None:
        if len(metrics) != 1:
            raise ValueError(f"ax= draws one metric, got {len(metrics)}; pass metrics=name")
        fig, axes = ax.figure, [ax]
    else:
        ncols = min(ncols, len(metrics))
        nrows = math.ceil(len(metrics) / ncols)
        fig, grid = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3 * nrows), squeeze=False)
        axes = list(grid.ravel())
        for extra in axes[len(metrics) :]:
            extra.remove()
        axes = axes[: len(metrics)]
    for metric, panel in zip(metrics, axes, strict=True):
        for stage, style in zip(_STAGES, ("-", "--"), strict=True):
            frame = history.get(f"{metric}_{stage}")
            if frame is not None and len(frame):
                panel.plot(frame.index, frame.iloc[:, 0], style, marker="o", markersize=3, label=stage)
        panel.set_title(metric)
        panel.set_xlabel("epoch")
        panel.legend(frameon=False)
    if ax is None:  # the caller's figure keeps its layout
        fig.tight_layout()
    return finish(fig, axes[0] if ax is not None else axes, show=show, return_fig=return_fig)
