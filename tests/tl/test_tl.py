from __future__ import annotations

import warnings
from unittest import mock

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

import sctransformer as sct

from ..conftest import QUIET, TINY, fingerprint

#: pbmc68k-like cell types: "/" cannot be in a column name of an .h5ad or .zarr DataFrame.
SLASHED = ["CD4+/CD45RA+/CD25- Naive T", "CD8+/CD45RA+ Naive Cytotoxic", "CD14+ Monocyte"]


def test_embed_writes_obsm_and_records_parameters(trained):
    model, data = trained
    adata = data.copy()
    assert sct.tl.embed(adata, model, pooling="mean") is None
    np.testing.assert_allclose(
        adata.obsm["X_sct"], model.get_latent_representation(data, pooling="mean"), atol=1e-6
    )
    assert adata.uns["sct"]["X_sct"]["params"] == {"pooling": "mean", "space": "cell"}
    sct.tl.embed(adata, model, key_added="X_other")
    assert "X_other" in adata.obsm and "X_other" in adata.uns["sct"]


def test_predict_writes_labels_confidence_and_probabilities(trained):
    model, data = trained
    adata = data.copy()
    sct.tl.predict(adata, model)
    assert isinstance(adata.obs["sct_cell_type"].dtype, pd.CategoricalDtype)
    assert list(adata.obs["sct_cell_type"].cat.categories) == ["type_0", "type_1", "type_2"]
    probs = adata.obsm["sct_cell_type_probs"]
    assert list(probs.columns) == ["type_0", "type_1", "type_2"]
    np.testing.assert_allclose(probs.to_numpy().sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(adata.obs["sct_cell_type_confidence"], probs.to_numpy().max(1))
    assert (adata.obs["sct_cell_type"].astype(str) == probs.idxmax(axis=1)).all()


def test_copy_leaves_the_input_untouched(trained):
    model, data = trained
    adata = data.copy()
    before = fingerprint(adata)
    out = sct.tl.embed(adata, model, copy=True)
    out = sct.tl.predict(out, model, copy=True)
    assert fingerprint(adata) == before
    assert "X_sct" in out.obsm and "sct_cell_type" in out.obs


def test_tools_run_on_an_unregistered_query_without_changing_it(trained):
    model, data = trained
    query = data[:40].copy()
    query.obs = query.obs[["cell_type"]].copy()
    query.uns = {}
    sct.tl.embed(query, model)
    sct.tl.predict(query, model)
    assert not any(c.startswith("_scvi") for c in query.obs)
    # the run record, and the colours that true and predicted labels share (scanpy's defaults)
    assert set(query.uns) == {"sct", "cell_type_colors", "sct_cell_type_colors"}


def test_predicted_labels_reuse_the_colours_of_the_true_labels(trained):
    model, data = trained
    adata = data.copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.reorder_categories(["type_2", "type_0", "type_1"])
    adata.uns["cell_type_colors"] = ["#ff0000", "#00ff00", "#0000ff"]
    sct.tl.predict(adata, model)
    colors = dict(
        zip(adata.obs["sct_cell_type"].cat.categories, adata.uns["sct_cell_type_colors"], strict=True)
    )
    assert colors == {"type_2": "#ff0000", "type_0": "#00ff00", "type_1": "#0000ff"}


def test_majority_vote_matches_a_naive_count():
    from sctransformer.tl._predict import majority_vote

    rng = np.random.default_rng(0)
    labels = pd.Categorical(
        rng.choice(["a", "b", "c"], size=200, p=[0.5, 0.3, 0.2]), categories=["a", "b", "c"]
    )
    clusters = rng.integers(0, 7, size=200)
    voted = majority_vote(pd.Series(labels), clusters)
    for c in range(7):
        members = np.asarray(labels)[clusters == c]
        values, counts = np.unique(members, return_counts=True)
        assert set(np.asarray(voted)[clusters == c]) == {values[np.argmax(counts)]}
    assert list(voted.categories) == ["a", "b", "c"]


def test_majority_vote_breaks_ties_by_category_order_not_alphabet():
    from sctransformer.tl._predict import majority_vote

    labels = pd.Categorical(["T", "B", "B", "T"], categories=["T", "B"])
    assert list(majority_vote(labels, [0, 0, 1, 1])) == ["T", "T", "T", "T"]


def test_majority_vote_leaves_cells_without_a_cluster_at_their_own_label():
    from sctransformer.tl._predict import majority_vote

    voted = majority_vote(["a", "b", "b", "a", "a"], [np.nan, np.nan, np.nan, "x", "x"])
    assert list(voted) == ["a", "b", "b", "a", "a"]  # not pooled into one "NaN cluster" voting "b"
    voted = majority_vote(["a", "b", "b", "a"], pd.Categorical([None, "x", "x", "x"]))
    assert list(voted) == ["a", "b", "b", "b"]


def test_predict_with_min_confidence_and_majority_voting(trained):
    model, data = trained
    adata = data.copy()
    before = fingerprint(adata)
    sct.tl.predict(adata, model, min_confidence=0.4, majority_voting=True)
    voted = adata.obs["sct_cell_type_majority_voting"]
    clusters = adata.obs["sct_over_clustering"]
    assert clusters.nunique() > 1
    for c in clusters.cat.categories:
        assert voted[clusters == c].nunique() == 1
    low = adata.obs["sct_cell_type_confidence"] < 0.4
    assert (adata.obs["sct_cell_type"][low] == "unknown").all()
    assert adata.uns["sct"]["sct"]["params"]["min_confidence"] == 0.4
    # only the documented keys were added
    after = fingerprint(adata)
    assert {k for k in after if after[k] != before.get(k)} == {"obs", "obsm/sct_cell_type_probs", "uns"}
    # a user-supplied clustering is used as is
    adata.obs["groups"] = pd.Categorical(np.where(np.arange(adata.n_obs) % 2, "odd", "even"))
    sct.tl.predict(adata, model, majority_voting=True, over_clustering="groups", key_added="v")
    assert adata.obs.groupby("groups", observed=True)["v_cell_type_majority_voting"].nunique().eq(1).all()


@pytest.fixture(scope="module")
def slashed():
    """A tiny model trained on cells whose types contain "/", as pbmc68k's do."""
    data = sct.datasets.synthetic(n_cells=120, n_genes=40, n_cell_types=3, n_markers=8, seed=2)
    data.obs["cell_type"] = data.obs["cell_type"].cat.rename_categories(SLASHED)
    sct.setup_anndata(data, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(data, **{**TINY, "max_length": 16})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=3, batch_size=32, **QUIET)
    return model, data


def _write_and_read(adata, path, fmt: str):
    """``adata`` written to ``path`` in ``fmt`` and read back, every warning an error."""
    if fmt == "zarr":
        pytest.importorskip("zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # anndata's notices about its own zarr format defaults, not about the data
        warnings.filterwarnings("ignore", message=".*(zarr v2|zarr v3|autosharding|[Cc]onsolidated metadata)")
        getattr(adata, f"write_{fmt}")(path)
        return getattr(ad, f"read_{fmt}")(path)


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_probabilities_of_labels_with_slashes_write_cleanly_and_keep_their_names(slashed, tmp_path, fmt):
    model, data = slashed
    adata = data.copy()
    sct.tl.predict(adata, model, min_confidence=0.5)
    back = _write_and_read(adata, tmp_path / f"predicted.{fmt}", fmt)
    probs = adata.obsm["sct_cell_type_probs"]
    assert list(probs.columns) == [c.replace("/", "_") for c in SLASHED]
    assert list(adata.uns["sct"]["sct"]["categories"]["cell_type"]) == SLASHED
    expected = model.predict(data, return_probabilities=True)[1]["cell_type"]
    np.testing.assert_allclose(probs.to_numpy(), expected.to_numpy())
    assert list(back.uns["sct"]["sct"]["categories"]["cell_type"]) == SLASHED
    pd.testing.assert_frame_equal(back.obsm["sct_cell_type_probs"], probs)
    # the most probable label is scored with its true name: "/" in it matches the truth
    best = expected.idxmax(axis=1).to_numpy()
    correct = data.obs["cell_type"].astype(str).to_numpy() == best
    assert correct.any() and any("/" in label for label in best[correct])
    ece = sct.metrics.expected_calibration_error(expected.max(axis=1).to_numpy(), correct, n_bins=5)
    title = sct.pl.calibration(back, "cell_type", "sct_cell_type", n_bins=5, show=False).get_title()
    assert title == f"ECE = {ece:.3f}"
    # without the run record (ad.concat drops .uns) the columns are matched to the labels
    del back.uns["sct"]
    assert sct.pl.calibration(back, "cell_type", "sct_cell_type", n_bins=5, show=False).get_title() == title


def test_probability_columns_are_distinct_and_writable():
    from sctransformer.tl._predict import probability_columns

    names = ["a/b", "a_b", "", "_index", ".hidden", "..", "zarr.json", "CD14+ Monocyte", "0"]
    columns = probability_columns(names)
    assert columns == ["a_b_2", "a_b", "_", "__index", "_.hidden", "_..", "_zarr.json", "CD14+ Monocyte", "0"]
    assert probability_columns([1, 2]) == ["1", "2"]


def test_predicted_columns_keep_only_the_categories_given_to_cells(trained):
    model, data = trained
    labels = model.predict(data)["cell_type"]
    kept = labels.cat.categories[labels.value_counts(sort=False).to_numpy() > 0][:2]
    assert len(kept) == 2
    query = data[labels.isin(kept).to_numpy()].copy()  # lacks the cells predicted as the other type(s)
    query.X = sct.metrics.log1p_normalise(query.layers["counts"])
    sct.tl.predict(query, model, min_confidence=1e-6, majority_voting=True)
    for column in ("sct_cell_type", "sct_cell_type_majority_voting"):
        categories = list(query.obs[column].cat.categories)
        assert categories == [c for c in labels.cat.categories if c in set(query.obs[column])]
    assert list(query.obs["sct_cell_type"].cat.categories) == list(kept)  # nor "unknown"
    # all of the model's categories are still in the probabilities and the run record
    assert list(query.obsm["sct_cell_type_probs"].columns) == ["type_0", "type_1", "type_2"]
    assert list(query.uns["sct"]["sct"]["categories"]["cell_type"]) == ["type_0", "type_1", "type_2"]
    sc.tl.rank_genes_groups(query, groupby="sct_cell_type", method="wilcoxon")
    sc.pl.dotplot(query, ["gene_0", "gene_8"], groupby="sct_cell_type", show=False)


def test_a_predict_run_without_a_vote_removes_the_votes_of_an_earlier_run(trained):
    model, data = trained
    adata = data.copy()
    sct.tl.predict(adata, model, majority_voting=True, resolution=0.5)
    adata.uns["sct_over_clustering_colors"] = ["#000000"]  # as scanpy writes when plotting them
    sct.tl.predict(adata, model)
    assert [c for c in adata.obs if c.startswith("sct")] == ["sct_cell_type", "sct_cell_type_confidence"]
    assert "sct_over_clustering_colors" not in adata.uns
    assert adata.uns["sct"]["sct"]["params"]["majority_voting"] is False


def test_tools_sharing_a_key_added_still_remove_their_own_stale_outputs(trained, tmp_path):
    model, data = trained
    adata = data.copy()
    options = {"predict_expression": False, "n_folds": 2}
    sct.tl.predict(adata, model, key_added="run1", majority_voting=True, resolution=0.5)
    sct.tl.perturb(adata, model, ["gene_0"], store_cell_shifts=True, key_added="run1", **options)
    sct.tl.embed(adata, model, key_added="run1")  # the last record of run1; the others kept in it
    assert set(adata.uns["sct"]["run1"]["others"]) == {"predict", "perturb"}
    adata.write_h5ad(tmp_path / "shared.h5ad")
    adata = ad.read_h5ad(tmp_path / "shared.h5ad")
    sct.tl.predict(adata, model, key_added="run1")  # no vote: the earlier run's clusters go
    assert "run1_over_clustering" not in adata.obs and "run1_cell_type_majority_voting" not in adata.obs
    sct.tl.perturb(adata, model, ["gene_1"], store_cell_shifts=True, key_added="run1", **options)
    assert "run1_gene_0" not in adata.obsm and "run1_gene_1" in adata.obsm
    assert "run1" in adata.obsm  # the embedding, which no later run replaced
    assert set(adata.uns["sct"]["run1"]["others"]) == {"predict", "embed"}


def test_each_key_added_votes_on_clusters_of_its_own(trained):
    model, data = trained
    adata = data.copy()
    sct.tl.predict(adata, model, majority_voting=True, key_added="A", resolution=0.5)
    first = adata.obs["A_over_clustering"].copy()
    sct.tl.predict(adata, model, majority_voting=True, key_added="B", resolution=3.0)
    pd.testing.assert_series_equal(adata.obs["A_over_clustering"], first)
    assert adata.obs["B_over_clustering"].nunique() > first.nunique()
    assert "sct_over_clustering" not in adata.obs
    for key in ("A", "B"):
        clusters = adata.obs[f"{key}_over_clustering"]
        assert (
            adata.obs.groupby(clusters, observed=True)[f"{key}_cell_type_majority_voting"]
            .nunique()
            .eq(1)
            .all()
        )
    # a vote on the clusters of an earlier run keeps them
    sct.tl.predict(adata, model, majority_voting=True, over_clustering="A_over_clustering", key_added="A")
    pd.testing.assert_series_equal(adata.obs["A_over_clustering"], first)


def test_predicted_labels_reuse_the_true_colours_next_to_a_grey_unknown(trained):
    model, data = trained
    adata = data.copy()
    adata.uns["cell_type_colors"] = ["#ff0000", "#00ff00", "#0000ff"]
    truth = dict(zip(["type_0", "type_1", "type_2"], adata.uns["cell_type_colors"], strict=True))
    threshold = float(np.median(model.predict(data)["cell_type_confidence"]))
    sct.tl.predict(adata, model, min_confidence=threshold, majority_voting=True)
    for column in ("sct_cell_type", "sct_cell_type_majority_voting"):
        categories = list(adata.obs[column].cat.categories)
        colors = dict(zip(categories, adata.uns[f"{column}_colors"], strict=True))
        assert colors == {c: truth.get(c, "#bbbbbb") for c in categories}
    assert "unknown" in adata.obs["sct_cell_type"].cat.categories
    # too few true colours: replaced by scanpy's defaults, as its plots would, and shared
    adata.uns["cell_type_colors"] = ["#ff0000"]
    sct.tl.predict(adata, model, min_confidence=threshold)
    assert len(adata.uns["cell_type_colors"]) == 3 and "sct_cell_type_colors" in adata.uns
    # colours that cannot be reused (true labels that are not categorical) are removed, not left from the
    # earlier run
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    sct.tl.predict(adata, model)
    assert "sct_cell_type_colors" not in adata.uns


def test_predicted_labels_share_the_default_colours_of_true_labels_without_colours(trained):
    from scanpy.plotting._utils import _set_default_colors_for_categorical_obs

    model, data = trained
    adata = data.copy()
    adata.uns.pop("cell_type_colors", None)
    threshold = float(np.median(model.predict(data)["cell_type_confidence"]))
    sct.tl.predict(adata, model, min_confidence=threshold)  # "unknown" is a label of its own
    # the true labels get the colours scanpy's plots would give them ...
    scanpys = ad.AnnData(obs=data.obs[["cell_type"]].copy())
    _set_default_colors_for_categorical_obs(scanpys, "cell_type")
    assert list(adata.uns["cell_type_colors"]) == list(scanpys.uns["cell_type_colors"])
    # ... and each predicted label the colour of the same true label
    truth = dict(zip(adata.obs["cell_type"].cat.categories, adata.uns["cell_type_colors"], strict=True))
    predicted = list(adata.obs["sct_cell_type"].cat.categories)
    assert "unknown" in predicted
    colors = dict(zip(predicted, adata.uns["sct_cell_type_colors"], strict=True))
    assert colors == {c: truth.get(c, "#bbbbbb") for c in predicted}


def test_perturb_replaces_the_cell_shifts_of_an_earlier_run(trained, tmp_path):
    model, data = trained
    adata = data.copy()
    options = {"predict_expression": False, "n_folds": 2}
    sct.tl.perturb(adata, model, ["gene_0", "gene_1"], store_cell_shifts=True, **options)
    assert {"sct_perturb_gene_0", "sct_perturb_gene_1"} <= set(adata.obsm)
    adata.write_h5ad(tmp_path / "perturbed.h5ad")
    adata = ad.read_h5ad(tmp_path / "perturbed.h5ad")
    sct.tl.perturb(adata, model, ["gene_9"], store_cell_shifts=True, **options)
    assert [k for k in adata.obsm if k.startswith("sct_perturb")] == ["sct_perturb_gene_9"]
    assert list(adata.uns["sct"]["sct_perturb"]["cell_shift_keys"]) == ["sct_perturb_gene_9"]
    sct.tl.perturb(adata, model, ["gene_2"], **options)
    assert not [k for k in adata.obsm if k.startswith("sct_perturb")]
    assert list(adata.uns["sct_perturb"]["summary"]["perturbed"].unique()) == ["gene_2"]
    # another key_added keeps its own
    sct.tl.perturb(adata, model, ["gene_3"], store_cell_shifts=True, key_added="other", **options)
    sct.tl.perturb(adata, model, ["gene_4"], **options)
    assert "other_gene_3" in adata.obsm


def test_perturb_with_copy_leaves_the_input_untouched(trained):
    model, data = trained
    adata = data.copy()
    before = fingerprint(adata)
    out = sct.tl.perturb(
        adata, model, "gene_0", predict_expression=False, n_folds=2, store_cell_shifts=True, copy=True
    )
    assert fingerprint(adata) == before and "sct_perturb" not in adata.uns
    assert isinstance(out, ad.AnnData) and out is not adata
    assert list(out.uns["sct_perturb"]["summary"]["perturbed"]) == ["gene_0"]
    assert out.obsm["sct_perturb_gene_0"].shape == (adata.n_obs, TINY["d_model"])
    assert isinstance(
        sct.tl.perturb(adata, model, "gene_0", predict_expression=False, n_folds=2), pd.DataFrame
    )


def test_perturb_with_copy_refuses_a_backed_adata_before_computing(trained, tmp_path):
    model, data = trained
    data.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    for cells in (backed, backed[:10]):  # a view of a backed AnnData is backed too
        with mock.patch.object(model, "perturb", side_effect=AssertionError("computed")):
            with pytest.raises(ValueError, match=r"copy=True cannot copy a backed AnnData.*to_memory\(\)"):
                sct.tl.perturb(cells, model, "gene_0", predict_expression=False, copy=True)
    # without copy the results go into the backed object's in-memory .uns and .obsm
    summary = sct.tl.perturb(backed, model, "gene_0", predict_expression=False, store_cell_shifts=True)
    assert list(summary["perturbed"]) == ["gene_0"] and "sct_perturb_gene_0" in backed.obsm


def test_perturb_refuses_genes_whose_cell_shift_keys_would_collide_before_computing():
    data = sct.datasets.synthetic(n_cells=40, n_genes=20, n_cell_types=2, n_markers=4, seed=5)
    data.var_names = ["HLA-A/B", "HLA-A_B", *data.var_names[2:]]
    sct.setup_anndata(data, layer="counts")
    model = sct.GeneTransformer(data, **TINY)
    with mock.patch.object(model, "perturb", side_effect=AssertionError("computed")):
        with pytest.raises(ValueError, match=r"'HLA-A/B' and 'HLA-A_B' -> 'sct_perturb_HLA-A_B'"):
            sct.tl.perturb(
                data, model, ["HLA-A/B", "HLA-A_B"], predict_expression=False, store_cell_shifts=True
            )
    assert not [k for k in data.obsm if k.startswith("sct_perturb")]
    # without cell shifts there is no .obsm key to share; one of them alone has its key
    sct.tl.perturb(data, model, ["HLA-A/B", "HLA-A_B"], predict_expression=False)
    sct.tl.perturb(data, model, iter(["HLA-A/B"]), predict_expression=False, store_cell_shifts=True)
    assert list(data.uns["sct"]["sct_perturb"]["cell_shift_keys"]) == ["sct_perturb_HLA-A_B"]


@pytest.mark.parametrize("tool", ["embed", "predict", "gene_graph", "gene_embedding", "gene_modules"])
def test_every_tool_refuses_to_copy_a_backed_adata_before_computing(trained, tmp_path, tool):
    model, data = trained
    data.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    calls = {
        "embed": lambda: sct.tl.embed(backed, model, copy=True),
        "predict": lambda: sct.tl.predict(backed, model, copy=True),
        "gene_graph": lambda: sct.tl.gene_graph(backed, model, copy=True),
        "gene_embedding": lambda: sct.tl.gene_embedding(backed, model, copy=True),
        "gene_modules": lambda: sct.tl.gene_modules(backed, copy=True),
    }
    with pytest.raises(ValueError, match=r"copy=True cannot copy a backed AnnData.*to_memory\(\)"):
        calls[tool]()


@pytest.mark.parametrize("tool", ["embed", "predict", "perturb", "gene_graph", "gene_embedding"])
def test_every_tool_refuses_a_view_of_a_backed_adata_before_computing(trained, tmp_path, tool):
    model, data = trained
    data.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    view = backed[: data.n_obs // 2]  # results cannot be written into it: anndata copies a backed view
    calls = {
        "embed": lambda: sct.tl.embed(view, model),
        "predict": lambda: sct.tl.predict(view, model),
        "perturb": lambda: sct.tl.perturb(view, model, "gene_0", predict_expression=False),
        "gene_graph": lambda: sct.tl.gene_graph(view, model),
        "gene_embedding": lambda: sct.tl.gene_embedding(view, model, kind="contextual"),
    }
    with mock.patch.object(model, "_forward", side_effect=AssertionError("computed")):
        with pytest.raises(ValueError, match=r"a view of a backed AnnData.*backed\[mask\]\.to_memory\(\)"):
            calls[tool]()
    assert view.is_view


def test_a_phenotype_key_with_a_slash_is_refused_at_setup():
    data = sct.datasets.synthetic(n_cells=30, n_genes=20, n_cell_types=2, n_markers=4, seed=0)
    data.obs["cell/type"] = data.obs["cell_type"]
    with pytest.raises(ValueError, match=r"'cell/type' contains '/'.*rename the column"):
        sct.setup_anndata(data, layer="counts", phenotype_keys=["cell/type"])
    assert "_scvi_manager_uuid" not in data.uns


def test_a_new_phenotype_key_with_a_slash_is_refused_by_load_query_data_before_registering(trained):
    model, _ = trained
    query = sct.datasets.synthetic(n_cells=30, n_genes=60, n_cell_types=3, n_markers=8, seed=4)
    query.obs["cell/type"] = query.obs["cell_type"]
    before = fingerprint(query)
    with pytest.raises(ValueError, match=r"'cell/type' contains '/'.*rename the column"):
        sct.GeneTransformer.load_query_data(query, model, phenotype_keys=["cell/type"])
    assert fingerprint(query) == before and "_scvi_manager_uuid" not in query.uns


@pytest.mark.parametrize("key", ["run/1", ""])
@pytest.mark.parametrize("tool", [sct.tl.embed, sct.tl.predict])
def test_embed_and_predict_refuse_a_key_added_with_a_slash_before_computing(trained, tool, key):
    model, data = trained
    adata = data.copy()
    before = fingerprint(adata)
    with (
        mock.patch.object(model, "_forward", side_effect=AssertionError("computed")),
        pytest.raises(ValueError, match=r"key_added must be a string without '/'.*got " + repr(key)),
    ):
        tool(adata, model, key_added=key)
    assert fingerprint(adata) == before


@pytest.mark.parametrize("key", ["run/1", "", "  "])
def test_perturb_refuses_a_key_added_hdf5_cannot_read_back_before_computing(trained, key):
    """tl.perturb writes .uns[key_added]: the same key check as the other tools, before the run."""
    model, data = trained
    adata = data.copy()
    before = fingerprint(adata)
    with (
        mock.patch.object(model, "perturb", side_effect=AssertionError("computed")),
        pytest.raises(ValueError, match=r"key_added must be a string without '/'.*got " + repr(key)),
    ):
        sct.tl.perturb(adata, model, "gene_0", predict_expression=False, key_added=key)
    assert fingerprint(adata) == before and key not in adata.uns


def test_min_confidence_is_refused_for_a_model_with_a_class_named_unknown(trained):
    model, data = trained
    named = data.copy()
    named.obs["cell_type"] = named.obs["cell_type"].astype(str).replace({"type_2": "unknown"})
    sct.setup_anndata(named, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(named, **TINY)
    with pytest.raises(ValueError, match="class named 'unknown'"):
        model.predict(named, min_confidence=0.6)
    assert "unknown" in model.predict(named)["cell_type"].cat.categories  # without it, predicted as usual


def test_majority_voting_on_one_or_two_cells_keeps_each_cells_label(trained):
    model, data = trained
    for n in (1, 2):
        cells = data[:n].copy()
        sct.tl.predict(cells, model, majority_voting=True)
        voted = [c for c in cells.obs if c.endswith("majority_voting")]
        assert voted and (cells.obs[voted[0]].astype(str) == cells.obs["sct_cell_type"].astype(str)).all()


def test_predicting_cells_without_counts_in_the_models_genes_warns(trained):
    model, data = trained
    cells = data[:10].copy()
    counts = cells.layers["counts"].tolil()
    counts[:3] = 0
    cells.layers["counts"] = counts.tocsr()
    with pytest.warns(UserWarning, match="^3 cells have no counts in the model's genes"):
        model.predict(cells)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.predict(data[10:20].copy())  # cells with counts: no warning


@pytest.mark.parametrize("tool", [sct.tl.embed, sct.tl.predict])
def test_tools_reading_counts_from_shards_refuse_cells_in_another_order_before_computing(
    trained, tool, tmp_path
):
    from sctransformer.data import ShardedAnnData

    model, data = trained
    data.write_h5ad(tmp_path / "cells.h5ad")
    shards = ShardedAnnData([str(tmp_path / "cells.h5ad")], layer="counts")
    in_order = ad.AnnData(obs=data.obs.copy())
    tool(in_order, model, counts=shards)
    if tool is sct.tl.embed:
        np.testing.assert_allclose(in_order.obsm["X_sct"], model.get_latent_representation(data), atol=1e-6)
    else:
        assert in_order.obs["sct_cell_type"].notna().all()
    reordered = ad.AnnData(obs=data.obs.iloc[::-1].copy())  # the same cells, another order
    renamed = ad.AnnData(obs=data.obs.set_axis([f"x{i}" for i in range(data.n_obs)]))
    for adata in (reordered, renamed):
        before = fingerprint(adata)
        with pytest.raises(ValueError, match=r"other cells or another order: \d+ of \d+ cell names differ"):
            tool(adata, model, counts=shards)
        assert fingerprint(adata) == before


def test_tools_reading_counts_from_shards_take_repeated_cell_names_made_unique(trained, tmp_path):
    from sctransformer.data import ShardedAnnData

    model, data = trained
    paths = []
    for i, part in enumerate((data[:70], data[70:140])):  # barcodes repeated across two samples
        part = part.copy()
        part.obs_names = [f"BC{j:04d}-1" for j in range(part.n_obs)]
        part.write_h5ad(tmp_path / f"s{i}.h5ad")
        paths.append(str(tmp_path / f"s{i}.h5ad"))
    shards = ShardedAnnData(paths, layer="counts")
    obs = ad.AnnData(obs=pd.concat([data.obs[:70], data.obs[70:140]]).set_axis(list(shards.obs_names)))
    obs.obs_names_make_unique()
    sct.tl.embed(obs, model, counts=shards)
    np.testing.assert_allclose(obs.obsm["X_sct"], model.get_latent_representation(data[:140]), atol=1e-6)
    obs.obs_names = [*obs.obs_names[:-2], obs.obs_names[-1], obs.obs_names[-2]]  # two cells swapped
    with pytest.raises(ValueError, match="2 of 140 cell names differ"):
        sct.tl.embed(obs, model, counts=shards)
