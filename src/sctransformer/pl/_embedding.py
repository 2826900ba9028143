"""UMAP of a cell embedding."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from sctransformer._keys import KEYS
from sctransformer.tl._utils import refuse_backed_copy

from ._utils import finish

#: Rows hashed at once: bounds the memory of the row bytes.
_CHUNK_ROWS = 65_536


def _row_hashes(x: Any) -> np.ndarray:
    """A 64-bit hash of each row of ``x``, of its values as float32 (SipHash of the row's bytes)."""
    x = np.asarray(x)
    x = x.reshape(len(x), -1)
    out = np.zeros(len(x), dtype=np.uint64)
    if x.shape[1] == 0:
        return out
    for start in range(0, len(x), _CHUNK_ROWS):
        block = np.ascontiguousarray(x[start : start + _CHUNK_ROWS], dtype=np.float32)
        rows = block.view(f"V{block.shape[1] * block.itemsize}").ravel().astype(object)  # bytes
        out[start : start + len(block)] = pd.util.hash_array(rows, categorize=False)
    return out


def _cell_fingerprints(embedding: Any, umap: Any) -> np.ndarray:
    """A 64-bit hash per cell of its embedding row together with its UMAP coordinates.

    Hashing cells one by one (rather than the whole matrix) lets a subset of the cells, such as a
    view ``adata[mask]``, be recognised as cells whose UMAP was computed from these very rows.
    """
    pairs = pd.DataFrame({"embedding": _row_hashes(embedding), "umap": _row_hashes(umap)})
    return pd.util.hash_pandas_object(pairs, index=False).to_numpy(dtype=np.uint64)


def _graph_is_of(adata: AnnData, basis: str, neighbors_key: str, n_checked: int = 200) -> bool:
    """Whether ``.uns[neighbors_key]`` is a neighbour graph of the current ``.obsm[basis]``.

    The stored distances of up to ``n_checked`` cells (spread over the data) must equal the
    distances, in the graph's recorded metric (and ``n_pcs`` columns), between their current rows.
    """
    from sklearn.metrics import pairwise_distances

    record = adata.uns.get(neighbors_key, {})
    params = record.get("params", {})
    distances = adata.obsp.get(record.get("distances_key", ""))
    if params.get("use_rep") != basis or distances is None:
        return False
    distances = sp.csr_matrix(distances)
    x = np.asarray(adata.obsm[basis], dtype=np.float64)[:, : params.get("n_pcs")]
    metric, kwds = params.get("metric", "euclidean"), dict(params.get("metric_kwds", {}))
    for i in np.unique(np.linspace(0, adata.n_obs - 1, min(n_checked, adata.n_obs)).astype(int)):
        row = slice(distances.indptr[i], distances.indptr[i + 1])
        try:
            actual = pairwise_distances(
                x[distances.indices[row]], x[i : i + 1], metric=metric, **kwds
            ).ravel()
        except (ValueError, TypeError):  # a metric sklearn does not know: cannot tell, so not taken
            return False
        if not np.allclose(distances.data[row], actual, rtol=1e-4, atol=1e-5):
            return False
    return True


def _umap_is_current(adata: AnnData, basis: str, umap_key: str, neighbors_key: str, n_neighbors: int) -> bool:
    """Whether every cell's ``.obsm[umap_key]`` was computed from its ``.obsm[basis]`` with ``n_neighbors``.

    Reads ``adata`` only, so that a view stays a view.
    """
    if umap_key not in adata.obsm:
        return False
    params = adata.uns.get(neighbors_key, {}).get("params", {})
    if params.get("n_neighbors") != n_neighbors:
        return False
    recorded = adata.uns.get(umap_key, {}).get("cell_fingerprints")
    if recorded is None:  # computed outside this function (sc.tl.umap): taken if its graph is of these rows
        return _graph_is_of(adata, basis, neighbors_key)
    current = _cell_fingerprints(adata.obsm[basis], adata.obsm[umap_key])
    return bool(np.isin(current, np.asarray(recorded, dtype=np.uint64)).all())


def _check_color(adata: AnnData, color: str | list[str] | None, gene_symbols: str | None) -> None:
    """Raise if a ``color`` key is neither an ``.obs`` column nor a gene (of ``.var`` or ``.raw``)."""
    keys = [color] if isinstance(color, str) or color is None else list(color)  # an Index too
    known = set(adata.obs.columns) | set(adata.var_names)
    for var in [adata.var] + ([] if adata.raw is None else [adata.raw.var]):
        known |= set(var.index) | (set(var[gene_symbols]) if gene_symbols in var else set())
    unknown = [key for key in keys if key is not None and key not in known]
    if unknown:
        raise KeyError(
            f"color {unknown} are neither adata.obs columns nor genes (e.g. {list(adata.obs.columns[:8])}); "
            "nothing was computed"
        )


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
    embedding or ``n_neighbors`` changed since), then calls :func:`scanpy.pl.embedding`. Whether
    they are stale is decided cell by cell (a hash of each cell's embedding row and UMAP
    coordinates is kept in ``.uns[f"{basis}_umap"]["cell_fingerprints"]``), so a subset of the
    cells, e.g. the view ``adata[mask]``, is drawn at its coordinates in the whole data's UMAP, as
    ``sc.pl.umap(adata[mask])`` does, and the view is left a view. A UMAP computed with scanpy
    into ``.obsm[f"{basis}_umap"]`` from the graph ``.uns[f"{basis}_neighbors"]`` is kept as it is
    where that graph has ``n_neighbors`` and its stored distances are those of the current
    ``.obsm[basis]`` (then it is recorded as computed from these rows).

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
    ``.uns[f"{basis}_neighbors"]`` / ``.uns[f"{basis}_umap"]`` when it (re)computes them (on a
    view, which then becomes an AnnData of its own, as with scanpy's functions; a view of a
    backed AnnData cannot, and is refused: load it first with ``.to_memory()``).
    """
    if basis not in adata.obsm:
        raise KeyError(f"adata.obsm[{basis!r}] not found; run sct.tl.embed(adata, model) first")
    _check_color(adata, color, kwargs.get("gene_symbols"))  # before a UMAP is computed for nothing
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, int | np.integer) or n_neighbors < 2:
        raise ValueError(
            f"n_neighbors must be an integer >= 2 (a UMAP needs neighbours), got {n_neighbors!r}"
        )
    n_neighbors = int(n_neighbors)
    neighbors_key = f"{basis}_neighbors"
    umap_key = f"{basis}_umap"
    if recompute or not _umap_is_current(adata, basis, umap_key, neighbors_key, n_neighbors):
        refuse_backed_copy(adata, copy=False)  # a view of a backed AnnData cannot take the UMAP
        sc.pp.neighbors(adata, use_rep=basis, n_neighbors=n_neighbors, key_added=neighbors_key)
        sc.tl.umap(adata, neighbors_key=neighbors_key, key_added=umap_key)
        fingerprints = np.unique(_cell_fingerprints(adata.obsm[basis], adata.obsm[umap_key]))
        record = {k: v for k, v in adata.uns.get(umap_key, {}).items() if k != "source_fingerprint"}
        adata.uns[umap_key] = {**record, "cell_fingerprints": fingerprints}
    elif "cell_fingerprints" not in adata.uns.get(umap_key, {}) and not adata.is_view:
        # a UMAP the user computed: kept, and from now on recognised as computed from these rows
        fingerprints = np.unique(_cell_fingerprints(adata.obsm[basis], adata.obsm[umap_key]))
        adata.uns[umap_key] = {**adata.uns.get(umap_key, {}), "cell_fingerprints": fingerprints}
    axes = sc.pl.embedding(adata, basis=umap_key, color=color, ax=ax, show=False, **kwargs)
    fig = (axes[0] if isinstance(axes, list) else axes).figure
    return finish(fig, axes, show=show, return_fig=return_fig)
