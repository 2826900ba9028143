"""Read minibatches of counts and phenotype codes from any AnnData, without changing it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData

from sctransformer._compat import quiet_sparse_tensors

from ._validation import get_matrix


def to_torch_csr(matrix) -> torch.Tensor:
    """A scipy sparse or dense row block as a torch sparse CSR tensor (no densifying of sparse input)."""
    if not sp.issparse(matrix):
        with quiet_sparse_tensors():
            return torch.as_tensor(np.asarray(matrix, dtype=np.float32)).to_sparse_csr()
    csr = matrix.tocsr()
    with quiet_sparse_tensors():
        return torch.sparse_csr_tensor(
            torch.from_numpy(csr.indptr.astype(np.int64)),
            torch.from_numpy(csr.indices.astype(np.int64)),
            torch.from_numpy(csr.data.astype(np.float32)),
            size=csr.shape,
        )


def iter_minibatches(
    adata: AnnData, *, layer: str | None, batch_size: int
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield ``(cell indices, CSR counts)`` of consecutive cells; backed matrices are read chunk by chunk."""
    matrix = get_matrix(adata, layer)
    for start in range(0, adata.n_obs, batch_size):
        stop = min(start + batch_size, adata.n_obs)
        yield np.arange(start, stop), to_torch_csr(matrix[start:stop])


def expressed_per_cell(
    adata: AnnData, *, layer: str | None, columns: np.ndarray | None = None, chunk_size: int = 10_000
) -> np.ndarray:
    """Number of non-zero entries of each cell, read in row chunks (backed matrices are never loaded whole).

    With ``columns`` (positions of genes), only the entries of those columns count.
    """
    matrix = get_matrix(adata, layer)
    out = np.zeros(adata.n_obs, dtype=np.int64)
    for start in range(0, adata.n_obs, chunk_size):
        block = matrix[start : start + chunk_size]
        if columns is not None:
            block = sp.csr_matrix(block)[:, columns] if sp.issparse(block) else np.asarray(block)[:, columns]
        if sp.issparse(block):  # != 0 builds a new matrix: the user's is never touched
            counts = np.asarray((block != 0).sum(axis=1)).ravel()
        else:
            counts = np.count_nonzero(np.asarray(block), axis=1)
        out[start : start + len(counts)] = counts
    return out


def cells_expressing(matrix, column_sets: Sequence[np.ndarray], *, chunk_size: int = 10_000) -> np.ndarray:
    """``(n_cells, len(column_sets))``: whether each cell has a count > 0 in any column of each set.

    One pass over ``matrix`` (cells x genes, in memory or backed) in row chunks, like
    :func:`expressed_per_cell`; a backed matrix is never loaded whole.
    """
    n_cells = matrix.shape[0]
    out = np.zeros((n_cells, len(column_sets)), dtype=bool)
    columns = np.concatenate([np.asarray(c, dtype=np.int64) for c in column_sets] + [np.zeros(0, np.int64)])
    owner = np.repeat(np.arange(len(column_sets)), [len(c) for c in column_sets])  # the set of each column
    if len(columns) == 0:
        return out
    for start in range(0, n_cells, chunk_size):
        block = matrix[start : start + chunk_size]
        if sp.issparse(block):
            hits = sp.csr_matrix(block)[:, columns].tocoo()
            positive = hits.data > 0
            rows, at = hits.row[positive], hits.col[positive]
        else:
            rows, at = np.nonzero(np.asarray(block)[:, columns] > 0)
        out[start + rows, owner[at]] = True
    return out
