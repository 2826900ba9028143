from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import sctransformer as sct
from sctransformer.data import GeneVocabulary


def test_setup_registers_fields_and_codes(adata):
    adata.obs.loc[adata.obs_names[:5], "cell_type"] = np.nan
    sct.setup_anndata(adata, layer="counts", batch_key="batch", phenotype_keys=["cell_type"])
    codes = adata.obs["_scvi_phenotype_cell_type"].to_numpy()
    assert (codes[:5] == -1).all()
    expected = pd.Categorical(
        adata.obs["cell_type"].astype(str), categories=["type_0", "type_1", "type_2"]
    ).codes
    np.testing.assert_array_equal(codes[5:], expected[5:])
    assert adata.obs["_scvi_batch"].nunique() == 2


def test_nan_in_a_phenotype_means_unknown_and_is_kept(adata):
    adata.obs["tissue"] = pd.Categorical(["a", np.nan] * 60)
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["tissue"])
    model = sct.GeneTransformer(adata, d_model=8, n_heads=2, n_layers=1)
    assert model.phenotype_categories_ == {"tissue": ["a"]}


def test_labels_that_look_like_missing_values_warn_with_the_fix(adata):
    labels = adata.obs["cell_type"].astype(object)
    labels.iloc[::4] = np.nan
    adata.obs["cell_type"] = labels.astype(str)  # NaN becomes the label "nan"
    with pytest.warns(UserWarning, match=r"labels \['nan'\] that look like missing values.*replace"):
        sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    adata.obs["cell_type"] = labels  # NaN itself: unknown, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])


def test_integer_labels_with_a_missing_value_are_labels_as_without_it():
    cells = sct.datasets.synthetic(n_cells=20, n_genes=30, n_cell_types=2, n_markers=4, seed=0)
    cells.obs["cluster"] = np.arange(20) % 12  # 12 integer labels over 20 cells: labels
    sct.setup_anndata(cells, layer="counts", phenotype_keys=["cluster"])
    cells.obs["cluster"] = cells.obs["cluster"].astype(float)
    cells.obs.iloc[0, cells.obs.columns.get_loc("cluster")] = np.nan  # pandas makes integers float so
    sct.setup_anndata(cells, layer="counts", phenotype_keys=["cluster"])
    cells.obs["cluster"] = np.linspace(0, 1, 20)  # but fractions are continuous
    with pytest.raises(ValueError, match="looks continuous"):
        sct.setup_anndata(cells, layer="counts", phenotype_keys=["cluster"])


def test_cells_without_counts_warn(adata):
    x = adata.layers["counts"].tolil()
    x[:3] = 0
    adata.layers["counts"] = x.tocsr()
    with pytest.warns(UserWarning, match="3 cells have no counts"):
        sct.setup_anndata(adata, layer="counts")


def test_dense_and_float_counts_are_accepted(adata):
    adata.layers["dense"] = adata.layers["counts"].toarray().astype(np.float64)
    sct.setup_anndata(adata, layer="dense")
    adata.X = sp.csr_matrix(adata.layers["counts"].astype(np.int32))
    sct.setup_anndata(adata)


def test_vocabulary_alignment_and_coverage(caplog):
    vocab = GeneVocabulary(["a", "b", "c", "d"])
    mapping = vocab.column_to_gene(pd.Index(["d", "x", "a"]))
    np.testing.assert_array_equal(mapping, [3, -1, 0])
    with pytest.raises(ValueError, match="shares 0 genes"):
        vocab.column_to_gene(pd.Index(["x", "y"]))


def test_vocabulary_logs_the_coverage_of_missing_model_genes_and_warns_when_most_are(caplog):
    vocab = GeneVocabulary([f"g{i}" for i in range(10)])
    with (
        caplog.at_level("INFO", logger="sctransformer"),
        pytest.warns(UserWarning, match="^the AnnData has 2 of"),
    ):
        vocab.column_to_gene(pd.Index(["g0", "g1"]))  # no gene unknown to the model, most of its missing
    assert "2 / 2 genes in vocabulary (2 of the model's 10 genes present)" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="sctransformer"), warnings.catch_warnings():
        warnings.simplefilter("error")
        vocab.column_to_gene(pd.Index([f"g{i}" for i in range(6)] + ["g0"]))  # 60%: no warning
        assert "7 / 7 genes in vocabulary (6 of the model's 10 genes present)" in caplog.text
        caplog.clear()
        vocab.column_to_gene(pd.Index([f"g{i}" for i in range(10)]))  # all of them: nothing to say
        assert caplog.text == ""
    big = GeneVocabulary([f"g{i}" for i in range(765)])
    with pytest.warns(UserWarning, match=r"380 of the model's 765 genes \(49\.7%, under 50%\)"):
        big.column_to_gene(pd.Index([f"g{i}" for i in range(380)]))


def test_advice_on_normalised_values_names_only_matrices_that_hold_counts(adata):
    counts = adata.layers["counts"]
    adata.layers["counts"] = counts.log1p()  # "counts" holds log values; X holds counts
    adata.X = counts.copy()
    with pytest.raises(ValueError, match=r"pass layer=None, adata\.X looks like counts"):
        sct.setup_anndata(adata, layer="counts")
    adata.X = counts.log1p()
    adata.layers["raw"] = counts.copy()
    with pytest.raises(ValueError, match=r"e\.g\. layer='raw'"):
        sct.setup_anndata(adata, layer="counts")
    del adata.layers["raw"]
    with pytest.raises(ValueError, match="no other matrix of adata looks like counts"):
        sct.setup_anndata(adata, layer="counts")
    reference = sct.datasets.synthetic(n_cells=30, n_genes=adata.n_vars, seed=5)
    sct.setup_anndata(reference, layer="counts")
    model = sct.GeneTransformer(reference, d_model=8, n_heads=2)
    with pytest.raises(ValueError, match=r"put them there, not normalised") as error:  # no source to copy
        model.get_latent_representation(adata)
    assert "= adata." not in str(error.value)
    adata.X = counts.copy()
    with pytest.raises(ValueError, match=r"put them there, e\.g\. adata\.layers\['counts'\] = adata\.X"):
        model.get_latent_representation(adata)


def test_categorical_phenotypes_keep_their_category_order(adata):
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.reorder_categories(["type_2", "type_0", "type_1"])
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    assert sct.GeneTransformer(adata, d_model=8, n_heads=2).phenotype_categories_ == {
        "cell_type": ["type_2", "type_0", "type_1"]
    }


def test_training_minibatches_reach_the_model_sparse(adata, monkeypatch):
    from sctransformer.train import MaskedModelingPlan

    layouts = []
    original = MaskedModelingPlan._step

    def spy(self, batch, **kwargs):
        layouts.append(batch["X"].layout)
        return original(self, batch, **kwargs)

    monkeypatch.setattr(MaskedModelingPlan, "_step", spy)
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, d_model=8, n_heads=2, n_layers=1)
    model.train(max_epochs=1, enable_progress_bar=False)
    assert layouts and all(layout == torch.sparse_csr for layout in layouts)


def test_integer_options_accept_numpy_integers_and_refuse_bools(adata):
    from sctransformer.data._validation import positive_int

    assert positive_int(np.int64(3), "n") == 3 and type(positive_int(np.int32(3), "n")) is int
    for bad in (True, 0, -1, 2.0, "3", None):
        with pytest.raises(ValueError, match="n must be a positive integer"):
            positive_int(bad, "n")
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, d_model=16, n_layers=1, n_heads=2, max_length=16)
    with pytest.raises(ValueError, match="max_epochs must be a positive integer, got True"):
        model.train(max_epochs=True)  # a bool is an int to Python, not an epoch count
    latent = model.get_latent_representation(batch_size=np.int64(50))  # e.g. from a NumPy computation
    assert latent.shape[0] == adata.n_obs
