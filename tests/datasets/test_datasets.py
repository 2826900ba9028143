from __future__ import annotations

import numpy as np
import pytest
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


def test_synthetic_categories_are_every_type_and_batch_in_numeric_order():
    adata = sct.datasets.synthetic(n_cells=20, n_genes=120, n_cell_types=12, n_markers=5, n_batches=4, seed=0)
    assert list(adata.obs["cell_type"].cat.categories) == [f"type_{t}" for t in range(12)]  # some undrawn
    assert list(adata.obs["batch"].cat.categories) == [f"batch_{b}" for b in range(4)]
    x = adata.layers["counts"].toarray()
    frac = x / x.sum(1, keepdims=True)
    for code, name in enumerate(adata.obs["cell_type"].cat.categories):  # type_t marks block t
        cells = (adata.obs["cell_type"] == name).to_numpy()
        if cells.any():
            block = frac[:, 5 * code : 5 * code + 5].sum(1)
            assert block[cells].mean() > 2 * block[~cells].mean(), name


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"n_cells": 0}, ValueError, "n_cells must be at least 1"),
        ({"n_genes": -3}, ValueError, "n_genes must be at least 1"),
        ({"n_cell_types": 0}, ValueError, "n_cell_types must be at least 1"),
        ({"n_batches": 0}, ValueError, "n_batches must be at least 1"),
        ({"n_markers": -1}, ValueError, "n_markers must be at least 0"),
        (
            {"n_markers": 40},
            ValueError,
            r"n_cell_types \* n_markers \(3 \* 40\) must not exceed n_genes \(100\)",
        ),
        ({"n_cells": 2.5}, TypeError, "n_cells must be an integer"),
        ({"n_batches": True}, TypeError, "n_batches must be an integer"),
        ({"n_genes": "100"}, TypeError, "n_genes must be an integer"),
        ({"mean_counts": -5}, ValueError, "mean_counts must be finite and positive"),
        ({"mean_counts": 0}, ValueError, "mean_counts must be finite and positive"),
        ({"mean_counts": float("nan")}, ValueError, "mean_counts must be finite and positive"),
        ({"mean_counts": float("inf")}, ValueError, "mean_counts must be finite and positive"),
        ({"mean_counts": "300"}, TypeError, "mean_counts must be a number"),
        ({"seed": -1}, ValueError, "seed must be a non-negative integer, got -1"),
        ({"seed": 1.5}, ValueError, "seed must be a non-negative integer, got 1.5"),
    ],
)
def test_synthetic_refuses_bad_arguments_naming_them(arguments, error, message):
    with pytest.raises(error, match=message):
        sct.datasets.synthetic(**arguments)


def test_synthetic_takes_numpy_numbers_and_no_markers():
    adata = sct.datasets.synthetic(
        n_cells=np.int64(20), n_genes=np.int32(10), n_markers=0, n_batches=1, mean_counts=np.float32(50)
    )
    assert adata.shape == (20, 10) and adata.obs["batch"].nunique() == 1
