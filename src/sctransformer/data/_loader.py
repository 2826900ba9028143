"""Read minibatches of counts and phenotype codes from any AnnData, without changing it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData

from sctransformer._compat import quiet_sparse_tensors

from ._fields import category_codes
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


def phenotype_codes(adata: AnnData, categories: dict[str, list[str]]) -> np.ndarray:
    """``(n_obs, n_phenotypes)`` codes among the model's categories; ``-1`` for unknown or absent."""
    codes = np.full((adata.n_obs, len(categories)), -1, dtype=np.int64)
    for slot, (key, cats) in enumerate(categories.items()):
        if key in adata.obs:
            codes[:, slot] = category_codes(adata.obs[key], cats)
    return codes


def iter_minibatches(
    adata: AnnData,
    *,
    layer: str | None,
    batch_size: int,
    indices: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield ``(cell indices, CSR counts)`` in order; backed matrices are read chunk by chunk."""
    matrix = get_matrix(adata, layer)
    if indices is None:
        indices = np.arange(adata.n_obs)
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        contiguous = len(idx) > 0 and idx[-1] - idx[0] == len(idx) - 1 and np.all(np.diff(idx) == 1)
        rows = matrix[idx[0] : idx[-1] + 1] if contiguous else matrix[np.sort(idx)]
        if not contiguous:
            # matrix rows came sorted; put them back in the requested order
            rows = rows[np.argsort(np.argsort(idx))]
        yield idx, to_torch_csr(rows)
