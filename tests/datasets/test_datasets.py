from __future__ import annotations

import numpy as np
import scanpy as sc

import sctransformer as sct


def test_pbmc68k_counts_are_integers_that_give_back_the_normalised_values():
    adata = sct.datasets.pbmc68k()
    assert adata.shape == (700, 765)
    counts = adata.layers["counts"]
    assert np.all(counts.data == np.round(counts.data)) and counts.data.min() > 0
    assert adata.obs["cell_type"].nunique() == 10
    source = sc.datasets.pbmc68k_reduced()
    recovered = np.log1p(counts.toarray() / source.obs["n_counts"].to_numpy()[:, None] * 1e4)
    np.testing.assert_allclose(recovered, source.raw.X.toarray(), atol=0.01)


def test_synthetic_shape_and_marker_structure():
    adata = sct.datasets.synthetic(n_cells=300, n_genes=40, n_cell_types=2, n_markers=5, seed=0)
    assert adata.shape == (300, 40)
    x = adata.layers["counts"].toarray()
    is_0 = (adata.obs["cell_type"] == "type_0").to_numpy()
    frac = x / x.sum(1, keepdims=True)
    assert frac[is_0, :5].mean() > 3 * frac[~is_0, :5].mean()
    assert frac[~is_0, 5:10].mean() > 3 * frac[is_0, 5:10].mean()
