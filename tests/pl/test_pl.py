from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import warnings

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from anndata import ImplicitModificationWarning
from matplotlib.axes import Axes
from matplotlib.figure import Figure

import sctransformer as sct

from ..conftest import TINY


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


def test_embedding_keeps_a_umap_the_user_computed_from_its_graph_and_then_tracks_it(trained):
    import scanpy as sc

    model, data = trained
    adata = data.copy()
    sct.tl.embed(adata, model)
    sc.pp.neighbors(adata, use_rep="X_sct", n_neighbors=15, key_added="X_sct_neighbors")
    sc.tl.umap(adata, neighbors_key="X_sct_neighbors", key_added="X_sct_umap", min_dist=1.0, random_state=7)
    own = adata.obsm["X_sct_umap"].copy()
    sct.pl.embedding(adata, color="cell_type", show=False)
    np.testing.assert_array_equal(adata.obsm["X_sct_umap"], own)  # kept
    cosine = data.copy()  # also a graph of another metric
    sct.tl.embed(cosine, model)
    sc.pp.neighbors(cosine, use_rep="X_sct", n_neighbors=15, metric="cosine", key_added="X_sct_neighbors")
    sc.tl.umap(cosine, neighbors_key="X_sct_neighbors", key_added="X_sct_umap", random_state=7)
    theirs = cosine.obsm["X_sct_umap"].copy()
    sct.pl.embedding(cosine, color="cell_type", show=False)
    np.testing.assert_array_equal(cosine.obsm["X_sct_umap"], theirs)
    assert cosine.uns["X_sct_neighbors"]["params"]["metric"] == "cosine"
    assert len(adata.uns["X_sct_umap"]["cell_fingerprints"]) == adata.n_obs
    adata.obsm["X_sct"] = adata.obsm["X_sct"] + 1.0  # stale now: recomputed
    sct.pl.embedding(adata, color="cell_type", show=False)
    assert not np.array_equal(adata.obsm["X_sct_umap"], own)
    again = data.copy()  # the user's graph and UMAP of an embedding since replaced are not taken
    sct.tl.embed(again, model)
    sc.pp.neighbors(again, use_rep="X_sct", n_neighbors=15, key_added="X_sct_neighbors")
    sc.tl.umap(again, neighbors_key="X_sct_neighbors", key_added="X_sct_umap", random_state=7)
    stale = again.obsm["X_sct_umap"].copy()
    again.obsm["X_sct"] = again.obsm["X_sct"][::-1].copy()  # e.g. another model's embedding
    sct.pl.embedding(again, color="cell_type", show=False)
    assert not np.array_equal(again.obsm["X_sct_umap"], stale)
    other = data.copy()  # a UMAP of another representation's graph is not taken
    sct.tl.embed(other, model)
    sc.pp.neighbors(other, n_neighbors=15, key_added="X_sct_neighbors")
    sc.tl.umap(other, neighbors_key="X_sct_neighbors", key_added="X_sct_umap", random_state=7)
    theirs = other.obsm["X_sct_umap"].copy()
    sct.pl.embedding(other, color="cell_type", show=False)
    assert not np.array_equal(other.obsm["X_sct_umap"], theirs)


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


def test_embedding_of_a_view_of_a_backed_adata_draws_a_current_umap_and_refuses_to_compute_one(
    trained, tmp_path
):
    model, data = trained
    adata = data.copy()
    sct.tl.embed(adata, model)
    adata.write_h5ad(tmp_path / "embedded.h5ad")
    backed = ad.read_h5ad(tmp_path / "embedded.h5ad", backed="r")
    with pytest.raises(ValueError, match=r"a view of a backed AnnData.*to_memory\(\)"):
        sct.pl.embedding(backed[:50], color="cell_type", show=False)  # no UMAP yet: one to compute
    sct.pl.embedding(adata, color="cell_type", show=False)
    adata.write_h5ad(tmp_path / "with_umap.h5ad")
    backed = ad.read_h5ad(tmp_path / "with_umap.h5ad", backed="r")
    sct.pl.embedding(backed[:50], color="cell_type", show=False)  # current: read, not written


def test_embedding_without_the_embedding_says_what_to_run(trained):
    _, data = trained
    with pytest.raises(KeyError, match=r"sct\.tl\.embed"):
        sct.pl.embedding(data.copy(), color="cell_type")


def test_embedding_with_an_unknown_color_key_fails_before_computing_anything(trained):
    model, data = trained
    adata = data.copy()
    sct.tl.embed(adata, model)
    before = (set(adata.uns), set(adata.obsm), set(adata.obsp))
    with pytest.raises(KeyError, match=r"color \['cell_typ'\] are neither adata\.obs columns nor genes"):
        sct.pl.embedding(adata, color=["cell_type", "cell_typ"])
    assert (set(adata.uns), set(adata.obsm), set(adata.obsp)) == before
    for bad in (1, "5", 2.5, True):
        with pytest.raises(ValueError, match=rf"n_neighbors must be an integer >= 2 .*got {bad!r}"):
            sct.pl.embedding(adata, color="cell_type", n_neighbors=bad)
    assert (set(adata.uns), set(adata.obsm), set(adata.obsp)) == before
    view = adata[:20]
    with pytest.raises(KeyError, match="cell_typ"):
        sct.pl.embedding(view, color="cell_typ")
    assert view.is_view
    adata.var["symbol"] = [f"sym{g}" for g in adata.var_names]  # genes, by name or by symbol
    sct.pl.embedding(adata, color=[adata.var_names[0], None], show=False)
    sct.pl.embedding(adata, color=adata.var_names[:2], show=False)  # an Index, as scanpy takes it
    sct.pl.embedding(adata, color=np.asarray(["cell_type"]), show=False)
    sct.pl.embedding(adata, color="sym" + adata.var_names[1], gene_symbols="symbol", show=False)


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


def test_training_history_and_integration_leave_the_layout_of_the_callers_figure_alone(trained):
    model, _ = trained
    scores = pd.DataFrame(
        {"iLISI": [0.2, 0.4], "Batch correction": [0.2, 0.4], "Total": [0.56, 0.52]}, index=["X_pca", "X_sct"]
    )
    draws = [
        lambda ax: sct.pl.training_history(model, metrics="loss", ax=ax, show=False),
        lambda ax: sct.pl.integration(scores, ax=ax, show=False),
    ]
    for draw in draws:
        fig, axes = plt.subplots(1, 2, layout="constrained")
        engine = fig.get_layout_engine()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "The figure layout has changed to tight"
            assert draw(axes[0]) is axes[0]
        assert fig.get_layout_engine() is engine
    # a figure of their own is still laid out tight
    for fig in (
        sct.pl.training_history(model, return_fig=True),
        sct.pl.integration(scores, return_fig=True),
    ):
        assert fig.subplotpars.left != plt.rcParams["figure.subplot.left"]  # moved by tight_layout


def test_training_history_says_what_is_wrong_with_the_model_or_the_arguments(trained):
    model, _ = trained
    cells = sct.datasets.synthetic(n_cells=40, n_genes=20, n_cell_types=2, n_markers=4, seed=0)
    sct.setup_anndata(cells, layer="counts")
    unlogged = sct.GeneTransformer(cells, **TINY)
    with pytest.raises(ValueError, match="no training history; train it first"):
        sct.pl.training_history(unlogged, show=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unlogged.train(max_epochs=1, batch_size=20, enable_progress_bar=False, logger=False)
    with pytest.raises(ValueError, match=r"recorded no training curves.*logger=False"):
        sct.pl.training_history(unlogged, show=False)
    with pytest.raises(ValueError, match=r"metrics is empty; pass one or more of \['loss'"):
        sct.pl.training_history(model, metrics=[], show=False)
    for ncols in (0, -1, 1.5):
        with pytest.raises(ValueError, match=f"ncols must be a positive integer, got {ncols}"):
            sct.pl.training_history(model, ncols=ncols, show=False)


def _response_of(cells, swap: dict) -> ad.AnnData:
    """What tl.predict_response returns for ``cells`` (values made up: pl.response reads its means)."""
    rng = np.random.default_rng(0)
    shape = (cells.n_obs, cells.n_vars)
    predicted = ad.AnnData(
        X=rng.random(shape, dtype=np.float32),
        obs=cells.obs.copy(),
        var=cells.var[[]].copy(),
        layers={"sct_baseline": rng.random(shape, dtype=np.float32)},
    )
    predicted.uns["sct_response"] = {"set": swap, "n_folds": 4, "refine_rounds": 0}
    return predicted


def _observed_change(counts: np.ndarray, target: np.ndarray, source: np.ndarray) -> np.ndarray:
    values = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    return values[target].mean(0) - values[source].mean(0)


def test_response_finds_the_swapped_in_cells_by_the_models_category_names():
    data = sct.datasets.synthetic(n_cells=60, n_genes=20, n_cell_types=2, n_markers=4, seed=3)
    counts = data.layers["counts"].toarray()
    even = np.arange(data.n_obs) % 2 == 0
    # a sampling day (datetime): the model names its categories '2020-01-08T00:00:00.000000000'
    data.obs["day"] = pd.to_datetime(np.where(even, "2020-01-01", "2020-01-08"))
    # a dose made float by a missing value (as after a concat): 1.0 is the model's category '1'
    data.obs["dose"] = np.where(even, 0.0, 1.0)
    data.obs.loc[data.obs_names[-1], "dose"] = np.nan
    late = sct.data.observed_categories(data.obs["day"])[1]
    assert late == "2020-01-08T00:00:00.000000000"
    for swap, target in (({"day": late}, ~even), ({"dose": "1"}, ~even & (np.arange(data.n_obs) < 59))):
        predicted = _response_of(data[even], swap)
        ax = sct.pl.response(predicted, data, show=False)
        _, y = np.asarray(ax.collections[0].get_offsets()).T
        np.testing.assert_allclose(y, _observed_change(counts, target, even), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_response_reads_the_counts_of_a_backed_adata(tmp_path, dense):
    data = sct.datasets.synthetic(n_cells=60, n_genes=20, n_cell_types=2, n_markers=4, seed=3)
    data.obs["condition"] = np.where(np.arange(data.n_obs) % 3 == 0, "ctrl", "stim")
    counts = data.layers["counts"].toarray()
    data.X = counts if dense else data.layers["counts"].copy()
    del data.layers["counts"]
    data.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    controls = (data.obs["condition"] == "ctrl").to_numpy()
    predicted = _response_of(data[controls], {"condition": "stim"})
    for observed in (backed, backed[::2]):  # a view of a backed AnnData too
        ax = sct.pl.response(predicted, observed, layer=None, show=False)
        _, y = np.asarray(ax.collections[0].get_offsets()).T
        kept = np.zeros(data.n_obs, dtype=bool)
        kept[np.arange(data.n_obs)[:: 1 if observed is backed else 2]] = True
        source = kept & controls
        np.testing.assert_allclose(
            y, _observed_change(counts, kept & ~controls, source), rtol=1e-5, atol=1e-6
        )
    from sctransformer.metrics._probes import mean_log1p_normalised

    rows = np.flatnonzero(~controls)
    np.testing.assert_allclose(
        mean_log1p_normalised(backed.X, rows, chunk_size=7),
        np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)[rows].mean(0),
        rtol=1e-6,
    )


def test_perturbation_plot_of_the_returned_table_with_a_gene_says_what_to_pass():
    table = pd.DataFrame(
        {
            "perturbed": ["gene_1"],
            "group": ["all"],
            "n_cells": [5],
            "embedding_shift": [0.1],
            "most_changed": ["gene_2 +0.100"],
            "max_abs_change": [0.1],
        }
    )
    assert sct.pl.perturbation(table, show=False) is not None
    with pytest.raises(ValueError, match=r"pass the AnnData it wrote to \(or the PerturbationResult"):
        sct.pl.perturbation(table, gene="gene_1", show=False)
