from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import sctransformer as sct
from sctransformer.data import expressed_per_cell, iter_minibatches, to_torch_csr

from ..conftest import QUIET

#: A model small enough to embed and train in about a second.
SMALL = {"d_model": 16, "n_layers": 1, "n_heads": 2, "max_length": 16, "n_bins": 5, "dropout": 0.0}


def split_duplicates(matrix: sp.csr_matrix, rng) -> sp.csr_matrix:
    """The same counts, as scipy reads them, in a non-canonical CSR matrix.

    Each count of 2 or more is stored as two entries for the same (cell, gene), and the entries of
    each cell are shuffled (unsorted column indices).
    """
    c = matrix.tocoo()
    big = c.data >= 2
    half = np.floor(c.data[big] / 2)
    first = c.data.copy()
    first[big] -= half
    rows = np.concatenate([c.row, c.row[big]])
    cols = np.concatenate([c.col, c.col[big]])
    vals = np.concatenate([first, half]).astype(np.float32)
    order = np.lexsort((rng.random(len(rows)), rows))  # by cell, shuffled within a cell
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=matrix.shape[0]))])
    out = sp.csr_matrix((vals[order], cols[order].astype(np.int32), indptr), shape=matrix.shape)
    assert not out.has_canonical_format and not out.has_sorted_indices
    assert abs(out - matrix).max() == 0  # on copies: the arithmetic leaves both matrices as they are
    return out


@pytest.fixture
def pair():
    """Synthetic counts, and a copy whose ``counts`` layer holds them in a non-canonical CSR matrix."""
    a = sct.datasets.synthetic(n_cells=80, n_genes=30, n_cell_types=3, n_markers=5, seed=0)
    b = a.copy()
    b.layers["counts"] = split_duplicates(a.layers["counts"], np.random.default_rng(0))
    return a, b


def snapshot(m: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return m.data.copy(), m.indices.copy(), m.indptr.copy()


def assert_unchanged(m: sp.csr_matrix, before) -> None:
    """Still the user's non-canonical matrix, entry for entry (no in-place ``sum_duplicates``)."""
    assert not m.has_canonical_format and not m.has_sorted_indices
    for now, then in zip((m.data, m.indices, m.indptr), before, strict=True):
        np.testing.assert_array_equal(now, then)


def test_to_torch_csr_reads_a_non_canonical_matrix_without_changing_it(pair):
    a, b = pair
    m = b.layers["counts"]
    before = snapshot(m)
    t = to_torch_csr(m)
    np.testing.assert_array_equal(t.to_dense().numpy(), a.layers["counts"].toarray())
    for _, x in iter_minibatches(b, layer="counts", batch_size=32):
        assert x.layout == torch.sparse_csr
    assert_unchanged(m, before)


def test_expressed_per_cell_counts_a_duplicated_gene_once(pair):
    a, b = pair
    before = snapshot(b.layers["counts"])
    np.testing.assert_array_equal(
        expressed_per_cell(b, layer="counts", chunk_size=16), expressed_per_cell(a, layer="counts")
    )
    assert_unchanged(b.layers["counts"], before)


def test_embedding_of_a_non_canonical_layer_equals_the_canonical_one(pair):
    a, b = pair
    before = snapshot(b.layers["counts"])
    sct.setup_anndata(a, layer="counts")
    sct.setup_anndata(b, layer="counts")
    model = sct.GeneTransformer(a, **SMALL, seed=0)
    np.testing.assert_allclose(
        model.get_latent_representation(b), model.get_latent_representation(a), rtol=0, atol=1e-5
    )
    assert_unchanged(b.layers["counts"], before)


def test_training_on_a_non_canonical_layer_equals_training_on_the_canonical_one(pair):
    """Training minibatches come through scvi-tools' loader, as stored: the tokenizer sums duplicates."""
    a, b = pair
    before = snapshot(b.layers["counts"])
    models = []
    for data in (a, b):
        sct.setup_anndata(data, layer="counts")
        model = sct.GeneTransformer(data, **SMALL, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.train(max_epochs=1, batch_size=32, seed=0, accelerator="cpu", **QUIET)
        models.append(model)
    for p, q in zip(models[0].module.parameters(), models[1].module.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
    assert_unchanged(b.layers["counts"], before)
