"""Small synthetic count data with cell-type structure, for tests and examples."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData


def synthetic(
    n_cells: int = 200,
    n_genes: int = 100,
    *,
    n_cell_types: int = 3,
    n_batches: int = 2,
    n_markers: int = 10,
    mean_counts: float = 300.0,
    seed: int = 0,
) -> AnnData:
    """Negative-binomial counts where each cell type over-expresses its own marker genes.

    Parameters
    ----------
    n_cells, n_genes
        Shape.
    n_cell_types
        Number of cell types; type ``t`` over-expresses genes ``t * n_markers`` to
        ``(t + 1) * n_markers - 1`` eight-fold.
    n_batches
        Number of batches; each scales all genes by a random batch factor.
    n_markers
        Marker genes per cell type.
    mean_counts
        Mean library size.
    seed
        Random seed.

    Returns
    -------
    AnnData with counts in ``X`` and ``layers["counts"]`` (CSR), ``obs["cell_type"]``,
    ``obs["batch"]`` and gene names ``gene_0`` ... in ``var_names``.
    """
    if n_cell_types * n_markers > n_genes:
        raise ValueError("n_cell_types * n_markers must not exceed n_genes")
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.6, 1.0, size=n_genes)
    cell_type = rng.integers(0, n_cell_types, size=n_cells)
    batch = rng.integers(0, n_batches, size=n_cells)
    batch_factor = rng.lognormal(0, 0.3, size=(n_batches, n_genes))
    rates = np.tile(base, (n_cells, 1)) * batch_factor[batch]
    for t in range(n_cell_types):
        rates[cell_type == t, t * n_markers : (t + 1) * n_markers] *= 8.0
    library = rng.lognormal(np.log(mean_counts), 0.3, size=n_cells)
    rates = rates / rates.sum(1, keepdims=True) * library[:, None]
    dispersion = 5.0
    counts = rng.negative_binomial(dispersion, dispersion / (dispersion + rates)).astype(np.float32)
    x = sp.csr_matrix(counts)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type_{t}" for t in cell_type]),
            "batch": pd.Categorical([f"batch_{b}" for b in batch]),
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene_{j}" for j in range(n_genes)])
    return AnnData(X=x, obs=obs, var=var, layers={"counts": x.copy()})
