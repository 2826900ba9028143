from __future__ import annotations

import numpy as np
import pandas as pd

import sctransformer as sct

from ..conftest import fingerprint


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
    assert set(query.uns) == {"sct"}


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
