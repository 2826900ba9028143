"""UMAP of a cell embedding."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import scanpy as sc
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from sctransformer._keys import KEYS

from ._utils import finish


def _fingerprint(x: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()


def embedding(
    adata: AnnData,
    *,
    basis: str = KEYS.EMBEDDING,
    color: str | list[str] | None = None,
    n_neighbors: int = 15,
    recompute: bool = False,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    **kwargs: Any,
) -> Figure | Axes | list[Axes] | None:
    """UMAP of a cell embedding, coloured by ``.obs`` columns or genes.

    Computes a neighbour graph and UMAP of ``.obsm[basis]`` when they are missing or stale (the
    embedding or ``n_neighbors`` changed since), then calls :func:`scanpy.pl.embedding`.

    Parameters
    ----------
    adata
        AnnData with ``.obsm[basis]``.
    basis
        ``.obsm`` key of the embedding, e.g. written by :func:`sctransformer.tl.embed`.
    color
        Keys to colour by, as in scanpy.
    n_neighbors
        Neighbours of the UMAP graph.
    recompute
        Recompute the neighbours and UMAP even if they are up to date.
    ax, show, return_fig
        As in scanpy: a Figure if ``return_fig``, nothing when shown, else the Axes.
    **kwargs
        Passed to :func:`scanpy.pl.embedding` (``palette``, ``legend_loc``, ``ncols``, ...).

    Returns
    -------
    As above; sets ``.obsm[f"{basis}_umap"]``, ``.obsp[f"{basis}_neighbors_*"]`` and
    ``.uns[f"{basis}_neighbors"]`` / ``.uns[f"{basis}_umap"]`` when it (re)computes them.
    """
    if basis not in adata.obsm:
        raise KeyError(f"adata.obsm[{basis!r}] not found; run sct.tl.embed(adata, model) first")
    neighbors_key = f"{basis}_neighbors"
    umap_key = f"{basis}_umap"
    fingerprint = _fingerprint(np.asarray(adata.obsm[basis]))
    record = adata.uns.get(umap_key, {})
    used = adata.uns.get(neighbors_key, {}).get("params", {}).get("n_neighbors")
    stale = (
        record.get("source_fingerprint") != fingerprint or umap_key not in adata.obsm or used != n_neighbors
    )
    if recompute or stale:
        sc.pp.neighbors(adata, use_rep=basis, n_neighbors=n_neighbors, key_added=neighbors_key)
        sc.tl.umap(adata, neighbors_key=neighbors_key, key_added=umap_key)
        adata.uns[umap_key] = {**adata.uns.get(umap_key, {}), "source_fingerprint": fingerprint}
    axes = sc.pl.embedding(adata, basis=umap_key, color=color, ax=ax, show=False, **kwargs)
    fig = (axes[0] if isinstance(axes, list) else axes).figure
    return finish(fig, axes, show=show, return_fig=return_fig)
