from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sctransformer as sct
from sctransformer.data import GeneVocabulary

from ..conftest import fingerprint


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


BAD_INPUTS = {
    "non-integer counts": (
        lambda a: a.layers.__setitem__("counts", a.layers["counts"] * 0.5),
        {},
        ValueError,
        "non-integer",
    ),
    "negative counts": (lambda a: a.layers["counts"].data.__setitem__(0, -3), {}, ValueError, "negative"),
    "NaN counts": (lambda a: a.layers["counts"].data.__setitem__(0, np.nan), {}, ValueError, "NaN"),
    "inf counts": (lambda a: a.layers["counts"].data.__setitem__(0, np.inf), {}, ValueError, "infinite"),
    "missing layer": (lambda a: None, {"layer": "raw_counts"}, KeyError, "raw_counts"),
    "missing batch key": (lambda a: None, {"batch_key": "donor"}, KeyError, "donor"),
    "missing phenotype key": (lambda a: None, {"phenotype_keys": ["tissue"]}, KeyError, "tissue"),
    "missing gene key": (lambda a: None, {"gene_key": "ensembl"}, KeyError, "ensembl"),
    "duplicate genes": (
        lambda a: setattr(a, "var_names", ["g0"] * 2 + list(a.var_names[2:])),
        {},
        ValueError,
        "duplicate gene",
    ),
    "phenotype all NaN": (
        lambda a: a.obs.__setitem__("cell_type", np.nan),
        {"phenotype_keys": ["cell_type"]},
        ValueError,
        "no known value",
    ),
    "batch with NaN": (
        lambda a: a.obs.__setitem__("batch", pd.Categorical([np.nan] + ["b"] * (a.n_obs - 1))),
        {"batch_key": "batch"},
        ValueError,
        "missing values",
    ),
    "boolean matrix": (
        lambda a: a.layers.__setitem__("counts", a.layers["counts"] > 0),
        {},
        TypeError,
        "booleans",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_error_and_leaves_adata_unchanged(adata, case):
    corrupt, kwargs, error, message = BAD_INPUTS[case]
    corrupt(adata)
    before = fingerprint(adata)
    kwargs = {"layer": "counts", **kwargs}
    with pytest.raises(error, match=message):
        sct.setup_anndata(adata, **kwargs)
    assert fingerprint(adata) == before


def test_zero_cells_and_zero_genes_are_refused(adata):
    with pytest.raises(ValueError, match="zero cells"):
        sct.setup_anndata(adata[:0].copy(), layer="counts")
    with pytest.raises(ValueError, match="zero genes"):
        sct.setup_anndata(adata[:, :0].copy(), layer="counts")


def test_a_view_is_refused_with_the_fix(adata):
    with pytest.raises(ValueError, match=r"adata.copy\(\)"):
        sct.setup_anndata(adata[:50], layer="counts")


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


def test_categorical_phenotypes_keep_their_category_order(adata):
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.reorder_categories(["type_2", "type_0", "type_1"])
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    assert sct.GeneTransformer(adata, d_model=8, n_heads=2).phenotype_categories_ == {
        "cell_type": ["type_2", "type_0", "type_1"]
    }
