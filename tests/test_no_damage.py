"""Every public call changes only the AnnData keys it documents."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

import sctransformer as sct

from .conftest import QUIET, TINY, fingerprint


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def uns_keys(adata) -> set[str]:
    return set(adata.uns.keys())


def test_each_public_call_changes_only_its_documented_keys(adata, tmp_path):
    adata.uns["cell_type_colors"] = ["#111111", "#222222", "#333333"]
    obs_before = set(adata.obs.columns)
    before, uns_before = fingerprint(adata), uns_keys(adata)
    sct.setup_anndata(adata, layer="counts", batch_key="batch", phenotype_keys=["cell_type"])
    assert set(adata.obs.columns) - obs_before == {"_scvi_batch", "_scvi_phenotype_cell_type"}
    assert uns_keys(adata) - uns_before == {"_scvi_uuid", "_scvi_manager_uuid"}
    assert changed(before, fingerprint(adata)) == {"obs", "uns"}  # nothing else: X, layers, var untouched

    model = sct.GeneTransformer(adata, **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, **QUIET)
    after_setup = fingerprint(adata)
    assert changed(after_setup, fingerprint(adata)) == set()  # building and training write nothing

    model.get_latent_representation()
    model.predict()
    model.save(tmp_path / "m")
    sct.GeneTransformer.load(tmp_path / "m")
    assert changed(after_setup, fingerprint(adata)) == set()  # getters, save and load write nothing

    obs_cols = set(adata.obs.columns)
    sct.tl.embed(adata, model)
    assert changed(after_setup, fingerprint(adata)) == {"obsm/X_sct", "uns"}
    after_embed = fingerprint(adata)
    sct.tl.predict(adata, model)
    assert changed(after_embed, fingerprint(adata)) == {"obs", "obsm/sct_cell_type_probs", "uns"}
    assert set(adata.obs.columns) - obs_cols == {"sct_cell_type", "sct_cell_type_confidence"}
    assert {"sct", "sct_cell_type_colors"} <= uns_keys(adata)

    after_predict = fingerprint(adata)
    sct.pl.embedding(adata, color="cell_type", show=False)
    plt.close("all")
    assert changed(after_predict, fingerprint(adata)) == {
        "obsm/X_sct_umap",
        "obsp/X_sct_neighbors_distances",
        "obsp/X_sct_neighbors_connectivities",
        "uns",
    }
    assert {"X_sct_neighbors", "X_sct_umap"} <= uns_keys(adata)
    sct.pl.training_history(model, show=False)
    plt.close("all")
    after_plots = fingerprint(adata)
    sct.pl.confusion_matrix(adata, "cell_type", "sct_cell_type", show=False)
    sct.pl.calibration(adata, "cell_type", "sct_cell_type", show=False)
    plt.close("all")
    assert changed(after_plots, fingerprint(adata)) == set()

    sct.tl.gene_graph(adata, model, top_k=3)
    assert changed(after_plots, fingerprint(adata)) == {"varp/sct_gene_graph"}  # and uns["sct"] entry
    assert {"sct_gene_graph"} <= set(adata.uns["sct"])
    after_graph = fingerprint(adata)
    sct.tl.gene_embedding(adata, model)
    assert changed(after_graph, fingerprint(adata)) == {"varm/sct_gene_embedding", "var"}
    assert "sct_gene_embedding_defined" in adata.var
    after_embedding = fingerprint(adata)
    sct.tl.gene_modules(adata, score=False)
    assert changed(after_embedding, fingerprint(adata)) == {"var"}
    assert {"sct_gene_embedding", "sct_gene_module"} <= set(adata.uns["sct"])
    after_modules = fingerprint(adata)
    sct.pl.gene_graph(adata, ["gene_0"], show=False)
    sct.pl.attention(adata, model, cell=0, show=False)
    sct.pl.gene_modules(adata, "cell_type", show=False)
    plt.close("all")
    assert changed(after_modules, fingerprint(adata)) == set()

    # copy=True returns a changed copy and leaves the input as it was
    for call in (
        lambda: sct.tl.embed(adata, model, key_added="X_copy", copy=True),
        lambda: sct.tl.predict(adata, model, key_added="copy", copy=True),
        lambda: sct.tl.gene_graph(adata, model, top_k=3, key_added="copy_graph", copy=True),
        lambda: sct.tl.gene_embedding(adata, model, key_added="copy_embedding", copy=True),
        lambda: sct.tl.gene_modules(adata, key_added="copy_module", score=False, copy=True),
    ):
        result = call()
        assert result is not adata and changed(fingerprint(result), after_modules)
        assert changed(after_modules, fingerprint(adata)) == set()
