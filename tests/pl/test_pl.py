from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import warnings

import matplotlib.pyplot as plt
import numpy as np
import pytest
from anndata import ImplicitModificationWarning
from matplotlib.axes import Axes
from matplotlib.figure import Figure

import sctransformer as sct


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def test_embedding_computes_umap_once_and_follows_scanpys_return_rule(trained):
    model, data = trained
    adata = data.copy()
    sct.tl.embed(adata, model)
    sct.tl.predict(adata, model)
    fig = sct.pl.embedding(adata, color=["cell_type", "sct_cell_type"], return_fig=True)
    assert isinstance(fig, Figure)
    assert adata.obsm["X_sct_umap"].shape == (adata.n_obs, 2)
    first = adata.obsm["X_sct_umap"].copy()
    axes = sct.pl.embedding(adata, color="cell_type", show=False)
    assert isinstance(axes, Axes)
    np.testing.assert_array_equal(adata.obsm["X_sct_umap"], first)  # not recomputed
    assert "cell_type_colors" in adata.uns
    adata.obsm["X_sct"] = adata.obsm["X_sct"] + 1.0  # stale: recomputed
    sct.pl.embedding(adata, color="cell_type", show=False)
    assert len(adata.uns["X_sct_umap"]["cell_fingerprints"]) == adata.n_obs and not np.array_equal(
        adata.obsm["X_sct_umap"], first
    )


def test_embedding_recomputes_the_umap_when_n_neighbors_changes(trained):
    model, data = trained
    adata = data.copy()
    sct.tl.embed(adata, model)
    sct.pl.embedding(adata, color="cell_type", n_neighbors=15, show=False)
    first = adata.obsm["X_sct_umap"].copy()
    sct.pl.embedding(adata, color="cell_type", n_neighbors=5, show=False)
    assert adata.uns["X_sct_neighbors"]["params"]["n_neighbors"] == 5
    assert not np.array_equal(adata.obsm["X_sct_umap"], first)


def test_embedding_of_a_view_draws_the_parents_umap_and_leaves_the_view_a_view(trained):
    model, data = trained
    adata = data.copy()
    sct.tl.embed(adata, model)
    sct.pl.embedding(adata, color="cell_type", show=False)
    full = adata.obsm["X_sct_umap"].copy()
    mask = (adata.obs["batch"] == adata.obs["batch"].iloc[0]).to_numpy()
    assert 0 < mask.sum() < adata.n_obs
    view = adata[mask]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImplicitModificationWarning)  # "initializing view as actual"
        ax = sct.pl.embedding(view, color="cell_type", show=False)
    assert view.is_view
    drawn = np.asarray(ax.collections[0].get_offsets())
    np.testing.assert_allclose(np.sort(drawn, axis=0), np.sort(full[mask], axis=0))
    np.testing.assert_array_equal(adata.obsm["X_sct_umap"], full)
    # a copy of the subset, in another order, is not stale either
    subset = adata[np.flatnonzero(mask)[::-1]].copy()
    sct.pl.embedding(subset, color="cell_type", show=False)
    np.testing.assert_array_equal(subset.obsm["X_sct_umap"], full[mask][::-1])
    # one cell's embedding changed: recomputed for the cells at hand
    subset.obsm["X_sct"][0] += 1.0
    sct.pl.embedding(subset, color="cell_type", show=False)
    assert subset.obsm["X_sct_umap"].shape == (mask.sum(), 2)
    assert not np.array_equal(subset.obsm["X_sct_umap"], full[mask][::-1])


def test_embedding_without_the_embedding_says_what_to_run(trained):
    _, data = trained
    with pytest.raises(KeyError, match=r"sct\.tl\.embed"):
        sct.pl.embedding(data.copy(), color="cell_type")


def test_training_history_draws_train_and_validation_per_component(trained):
    model, _ = trained
    fig = sct.pl.training_history(model, return_fig=True)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "loss"
    assert {"expression", "phenotype_cell_type", "phenotype_cell_type_accuracy"} <= set(titles)
    loss_ax = fig.axes[0]
    assert sorted(line.get_label() for line in loss_ax.get_lines()) == ["train", "validation"]
    assert len(loss_ax.get_lines()[0].get_xdata()) == 3  # one point per epoch
    ax = sct.pl.training_history(model, metrics=["loss"], show=False)
    assert isinstance(ax, list) and isinstance(ax[0], Axes)
    with pytest.raises(KeyError, match="available"):
        sct.pl.training_history(model, metrics=["nope"], show=False)


def test_training_history_takes_one_metric_as_a_string(trained):
    model, _ = trained
    axes = sct.pl.training_history(model, metrics="loss", show=False)
    assert [ax.get_title() for ax in axes] == ["loss"]
    _, ax = plt.subplots()
    assert sct.pl.training_history(model, metrics="loss", ax=ax, show=False) is ax
    assert ax.get_title() == "loss"
