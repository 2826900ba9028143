"""Cross-modal retrieval: does a cell's embedding in one modality find its partner in the other."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

#: Cosine similarities within this of a partner's tie with it. Similarities of unit vectors
#: (so the tolerance is relative to their norm of 1) computed in float64 carry rounding noise
#: near 1e-16 that depends on how the product is blocked: identical targets must tie whatever
#: the blocking, and targets this close are not told apart by any retrieval worth the name.
TIE_TOLERANCE = 1e-9


def obsm_dense(adata: AnnData, key: str) -> np.ndarray:
    """``adata.obsm[key]`` as a dense float64 matrix; a sparse one is densified.

    An embedding has a few hundred columns at most, so its dense copy is small, and the cosine
    similarities and neighbour searches of the metrics need dense rows anyway.
    """
    values = adata.obsm[key]
    try:
        dense = np.asarray(values.toarray() if sp.issparse(values) else values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"adata.obsm[{key!r}] ({type(values).__name__}) is not a numeric matrix: {err}"
        ) from None
    if dense.ndim != 2:
        raise ValueError(f"adata.obsm[{key!r}] must be a matrix (n_cells, n_dims), got shape {dense.shape}")
    return dense


def retrieval_ranks(queries: np.ndarray, targets: np.ndarray, *, chunk_size: int = 2048) -> np.ndarray:
    """Rank (1 = best) of target ``i`` among all targets by cosine similarity to query ``i``.

    Ties count against the cell (a target as similar as its partner ranks before it), so a
    collapsed embedding cannot score well. Similarities within :data:`TIE_TOLERANCE` of the
    partner's tie with it, so that identical targets tie whatever the rounding of the product
    (and ``chunk_size``).

    Parameters
    ----------
    queries, targets
        Embeddings ``(n_cells, n_dims)`` of the same cells in the same order, finite.
    chunk_size
        Queries compared at once (bounds the memory to ``chunk_size × n_cells`` similarities).

    Returns
    -------
    The rank of each cell's partner, from 1 to ``n_cells``.
    """
    queries = np.asarray(queries, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    if queries.ndim != 2 or queries.shape != targets.shape:
        raise ValueError(
            f"queries {queries.shape} and targets {targets.shape} must be 2-D and of the same shape "
            "(n_cells, n_dims): row i of each is the same cell"
        )
    for name, values in (("queries", queries), ("targets", targets)):
        bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
        if len(bad):
            shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
            raise ValueError(
                f"{name} hold NaN or infinite values in {len(bad)} of {len(values)} cells (rows {shown}); "
                "leave those cells out of both embeddings"
            )
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True).clip(1e-12)
    t = targets / np.linalg.norm(targets, axis=1, keepdims=True).clip(1e-12)
    ranks = np.empty(len(q), dtype=np.int64)
    for start in range(0, len(q), chunk_size):
        similarity = q[start : start + chunk_size] @ t.T
        own = similarity[np.arange(len(similarity)), np.arange(start, start + len(similarity))]
        ranks[start : start + len(similarity)] = (similarity >= own[:, None] - TIE_TOLERANCE).sum(1)
    return ranks


def cross_modal_retrieval(
    adata: AnnData,
    key_a: str,
    key_b: str,
    *,
    k: int | Sequence[int] = (1, 5, 10),
    seed: int = 0,
) -> pd.DataFrame:
    """Recall@k and rank of each cell's partner across two aligned embeddings, against shuffled pairs.

    For every cell, the other modality's embeddings of all cells are ranked by cosine similarity
    to its embedding in one modality; the cell's own partner should come first. The control pairs
    each cell with another cell's partner (a random permutation), which gives recall@k near
    ``k / n_cells``.

    Parameters
    ----------
    adata
        Cells with both embeddings in ``.obsm`` (not modified); a sparse embedding is densified.
    key_a, key_b
        ``.obsm`` keys of the two embeddings, same width (e.g. ``model.get_latent_representation``
        with ``space="aligned"`` and ``space="aligned_other"``).
    k
        The ``k`` of recall@k: one or several.
    seed
        Seed of the control's permutation.

    Returns
    -------
    Rows ``"a -> b"``, ``"b -> a"`` and the same with ``", shuffled pairs"``; columns
    ``recall@k`` for each ``k``, ``mean rank`` and ``median rank``.
    """
    for key in (key_a, key_b):
        if key not in adata.obsm:
            raise KeyError(f"embedding {key!r} not found in adata.obsm (available: {list(adata.obsm)})")
    a, b = (obsm_dense(adata, key) for key in (key_a, key_b))
    if a.shape != b.shape:
        raise ValueError(f"{key_a!r} {a.shape} and {key_b!r} {b.shape} must have the same shape")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("the embeddings hold NaN or infinite values")
    ks = [int(x) for x in ([k] if np.ndim(k) == 0 else k)]
    if not ks or any(x < 1 for x in ks):
        raise ValueError(f"k must be positive integers, got {k!r}")
    shuffled = np.random.default_rng(seed).permutation(len(b))
    rows = {}
    for name, queries, targets in (
        ("a -> b", a, b),
        ("b -> a", b, a),
        ("a -> b, shuffled pairs", a, b[shuffled]),
        ("b -> a, shuffled pairs", b[shuffled], a),
    ):
        ranks = retrieval_ranks(queries, targets)
        rows[name] = {f"recall@{x}": float((ranks <= x).mean()) for x in ks}
        rows[name] |= {"mean rank": float(ranks.mean()), "median rank": float(np.median(ranks))}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.attrs["keys"] = {"a": key_a, "b": key_b}
    return table
