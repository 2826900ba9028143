"""Integer counts rebuilt from scanpy's bundled ``pbmc68k_reduced``."""

from __future__ import annotations

import numpy as np
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData


def pbmc68k() -> AnnData:
    """700 PBMCs x 765 genes with raw counts and 10 cell-type labels.

    Built from scanpy's bundled :func:`scanpy.datasets.pbmc68k_reduced` (no download). Its
    ``.raw.X`` holds ``log1p(counts / n_counts * 1e4)``, so
    ``round(expm1(raw.X) * n_counts / 1e4)`` gives back the integer counts.

    Returns
    -------
    AnnData with ``layers["counts"]`` (integer counts, CSR), ``X`` = log1p-normalised values (as
    in the source), ``obs["cell_type"]`` (from ``bulk_labels``), and the source's ``obs``,
    ``obsm["X_umap"]`` and ``obsm["X_pca"]``.
    """
    source = sc.datasets.pbmc68k_reduced()
    raw = source.raw.X
    raw = raw.tocsr() if sp.issparse(raw) else sp.csr_matrix(raw)
    scale = source.obs["n_counts"].to_numpy()[:, None] / 1e4
    counts = raw.copy()
    counts.data = np.expm1(counts.data)
    counts = sp.csr_matrix(counts.multiply(scale))
    counts.data = np.round(counts.data)
    counts.eliminate_zeros()
    counts = counts.astype(np.float32)
    adata = AnnData(
        X=raw.astype(np.float32),
        obs=source.obs.copy(),
        var=source.raw.var.copy(),
        layers={"counts": counts},
    )
    adata.obs["cell_type"] = source.obs["bulk_labels"].astype("category")
    for key in ("X_umap", "X_pca"):
        adata.obsm[key] = source.obsm[key].copy()
    adata.uns["source"] = "scanpy.datasets.pbmc68k_reduced (raw counts recovered from .raw.X)"
    return adata
