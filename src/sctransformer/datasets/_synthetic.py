"""Small synthetic count data with cell-type structure, for tests and examples."""

from __future__ import annotations

from numbers import Integral, Real

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
        Shape, at least 1 each.
    n_cell_types
        Number of cell types, at least 1; type ``t`` over-expresses genes ``t * n_markers`` to
        ``(t + 1) * n_markers - 1``: their rates are multiplied by eight before each cell's rates
        are scaled to its library size, so the fold change in counts is somewhat less or more.
    n_batches
        Number of batches, at least 1; each scales all genes by a random batch factor.
    n_markers
        Marker genes per cell type, at least 0; ``n_cell_types * n_markers`` at most ``n_genes``.
    mean_counts
        Median library size (libraries are log-normal with sigma 0.3 around it, so their mean is
        about 4.6% higher), finite and positive.
    seed
        Random seed.

    Raises
    ------
    TypeError
        If a count is not an integer or ``mean_counts`` not a number.
    ValueError
        If an argument is out of its range.

    Returns
    -------
    AnnData with counts in ``X`` and ``layers["counts"]`` (CSR), ``obs["cell_type"]`` (categories
    ``type_0`` ... ``type_<n_cell_types - 1>`` in that order, also those no cell drew),
    ``obs["batch"]`` (likewise) and gene names ``gene_0`` ... in ``var_names``.
    """
    for name, value, least in (
        ("n_cells", n_cells, 1),
        ("n_genes", n_genes, 1),
        ("n_cell_types", n_cell_types, 1),
        ("n_batches", n_batches, 1),
        ("n_markers", n_markers, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")
    if n_cell_types * n_markers > n_genes:
        raise ValueError(
            f"n_cell_types * n_markers ({n_cell_types} * {n_markers}) must not exceed n_genes ({n_genes}): "
            "each cell type has its own marker genes"
        )
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(mean_counts, bool) or not isinstance(mean_counts, Real):
        raise TypeError(f"mean_counts must be a number, got {mean_counts!r}")
    if not (np.isfinite(mean_counts) and mean_counts > 0):
        raise ValueError(f"mean_counts must be finite and positive, got {mean_counts}")
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
            # every type and batch, in numeric order: type_t is code t (type_10 after type_9)
            "cell_type": pd.Categorical.from_codes(cell_type, [f"type_{t}" for t in range(n_cell_types)]),
            "batch": pd.Categorical.from_codes(batch, [f"batch_{b}" for b in range(n_batches)]),
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene_{j}" for j in range(n_genes)])
    return AnnData(X=x, obs=obs, var=var, layers={"counts": x.copy()})
