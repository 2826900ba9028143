"""Shared helpers of the plot functions: new axes, scanpy's return rule."""

from __future__ import annotations

import matplotlib.pyplot as plt
import scanpy as sc
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def finish(
    fig: Figure, axes: Axes | list[Axes], *, show: bool | None, return_fig: bool
) -> Figure | Axes | list[Axes] | None:
    """Figure if ``return_fig``; nothing when shown; else the Axes."""
    if return_fig:
        return fig
    if show is None:
        show = sc.settings.autoshow
    if show:
        plt.show()
        return None
    return axes


def new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """``ax`` and its figure, or a new figure of ``figsize`` with one Axes."""
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax
