"""Scanpy's return rule for plot functions."""

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
