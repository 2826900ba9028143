"""scIB-style table of integration scores."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ._utils import finish, new_axes

_AGGREGATES = ("Bio conservation", "Batch correction", "Total")


def integration(
    results: pd.DataFrame,
    *,
    cmap: str = "viridis",
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | Axes | None:
    """Integration scores as a table: one row per embedding, best total first (as scIB draws it).

    Each metric is a circle whose size and colour give its score (0 to 1); the aggregate scores
    (bio conservation, batch correction, total) are bars. Scores are printed in every cell.

    Parameters
    ----------
    results
        The table of :func:`sctransformer.metrics.integration`.
    cmap
        Colour map of the metric circles.
    ax
        Axes to draw into (its figure's layout is left as it is); default a new figure sized to
        the table, laid out tight.
    show, return_fig
        As in scanpy: a Figure if ``return_fig``, nothing when shown, else the Axes.
    """
    if not isinstance(results, pd.DataFrame) or "Total" not in results:
        raise ValueError(
            "results must be the table of sctransformer.metrics.integration (with a 'Total' column)"
        )
    table = results.sort_values("Total", ascending=False)
    metric_type = results.attrs.get("metric_type", {})
    metrics = [c for c in table.columns if c not in _AGGREGATES]
    metrics.sort(key=lambda c: (metric_type.get(c) != "Bio conservation", list(table.columns).index(c)))
    columns = metrics + [c for c in _AGGREGATES if c in table]
    n_rows, n_cols = table.shape[0], len(columns)
    own_figure = ax is None  # the caller's figure keeps its layout
    fig, ax = new_axes(ax, (1.0 + 1.1 * n_cols, 0.9 + 0.55 * n_rows))
    colours = plt.get_cmap(cmap)
    for j, column in enumerate(columns):
        for i, value in enumerate(table[column].to_numpy()):
            y = n_rows - 1 - i
            score = float(np.clip(value, 0, 1)) if np.isfinite(value) else 0.0
            if column in _AGGREGATES:
                ax.barh(y, 0.9 * score, left=j - 0.45, height=0.5, color="0.45")
            else:
                ax.scatter(j, y, s=80 + 520 * score, color=colours(score), edgecolor="0.3", linewidth=0.5)
            ax.text(j, y - 0.38, f"{value:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(n_cols), columns, rotation=45, ha="right")
    ax.set_yticks(range(n_rows), list(table.index[::-1]))
    ax.set_xlim(-0.6, n_cols - 0.4)
    ax.set_ylim(-0.7, n_rows - 0.4)
    ax.axvline(len(metrics) - 0.5, color="0.7", linewidth=0.8)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(length=0)
    ax.set_title("integration scores (scIB metrics)")
    if own_figure:
        fig.tight_layout()
    return finish(fig, ax, show=show, return_fig=return_fig)
