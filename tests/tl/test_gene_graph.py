from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch

import sctransformer as sct
from sctransformer.data import to_torch_csr
from sctransformer.tl import AttentionAccumulator, CoAttentionAccumulator

from ..conftest import QUIET, TINY, fingerprint


def naive_scores(genes: np.ndarray, attention: np.ndarray, n_genes: int, normalize: str, symmetrize: bool):
    """Dense score matrix and co-presence counts by loops over cells and token pairs."""
    total = np.zeros((n_genes, n_genes))
    together = np.zeros((n_genes, n_genes))
    for c in range(genes.shape[0]):
        n_tokens = int((genes[c] != -1).sum())
        for i in range(genes.shape[1]):
            for j in range(genes.shape[1]):
                gi, gj = genes[c, i], genes[c, j]
                if gi < 0 or gj < 0 or i == j:
                    continue
                scale = n_tokens if normalize == "coexpression" else 1
                total[gi, gj] += attention[c, i, j] * scale
                together[gi, gj] += 1
    if symmetrize:
        total = (total + total.T) / 2
    if normalize == "coexpression":
        score = np.divide(total, together, out=np.zeros_like(total), where=together > 0)
    else:
        score = total / genes.shape[0]
    return score, together


@pytest.mark.parametrize("normalize", ["coexpression", "none"])
@pytest.mark.parametrize("symmetrize", [True, False])
def test_accumulator_matches_a_naive_loop_over_cells(normalize, symmetrize):
    rng = np.random.default_rng(0)
    n_genes, n_cells, length = 7, 9, 5
    genes = np.full((n_cells, length), -1)
    for c in range(n_cells):
        n = rng.integers(0, length + 1)
        genes[c, :n] = rng.choice(np.r_[np.arange(n_genes), -2, -2], size=n, replace=False)
    attention = rng.random((n_cells, length, length)).astype(np.float32)
    accumulator = AttentionAccumulator(n_genes, normalize)
    for part in (slice(0, 4), slice(4, None)):  # two minibatches
        accumulator.add(torch.as_tensor(genes[part]), torch.as_tensor(attention[part]))
    score, together = naive_scores(genes, attention, n_genes, normalize, symmetrize)

    graph = accumulator.graph(n_genes - 1, min_cells=1, symmetrize=symmetrize).toarray()
    np.testing.assert_allclose(graph, score, rtol=1e-5, atol=1e-6)

    # min_cells drops rarely co-present pairs; top_k keeps each gene's strongest edges
    graph = accumulator.graph(2, min_cells=2, symmetrize=symmetrize).toarray()
    score[together < 2] = 0
    for i in range(n_genes):
        expected = sorted(score[i][score[i] > 0], reverse=True)[:2]
        kept = graph[i][graph[i] > 0]
        if symmetrize:  # own top 2 are kept, plus edges where i is in another gene's top 2
            assert all(np.isclose(kept, value, rtol=1e-5).any() for value in expected)
        else:
            np.testing.assert_allclose(sorted(kept, reverse=True), expected, rtol=1e-5)
    if symmetrize:
        np.testing.assert_array_equal(graph, graph.T)


def per_cell_attention(model, adata):
    """For one cell at a time: its gene tokens' columns of ``adata``, and its attention map (all
    tokens, prefix first), heads and every layer averaged: the naive reference of the graph tests."""
    module = model.module.eval()
    column_to_gene = torch.as_tensor(model._column_to_gene(adata))
    vocabulary_to_column = {int(g): c for c, g in enumerate(column_to_gene) if g >= 0}
    for c in range(adata.n_obs):
        x = to_torch_csr(sp.csr_matrix(adata.layers["counts"][c]))
        with torch.no_grad():
            tokens = module.tokenize(x, column_to_gene)
            _, maps = module.encode_with_attention(
                tokens, torch.full((1, module.n_phenotypes), -1), list(range(len(module.blocks)))
            )
        ids = [vocabulary_to_column[int(g)] for g in tokens.gene_ids[0][tokens.is_token[0]]]
        yield ids, np.mean([m[0].mean(0).numpy() for m in maps], axis=0)


def test_gene_graph_equals_per_cell_attention_aggregated_by_hand(trained):
    model, data = trained
    adata = data[:40].copy()
    before = fingerprint(adata)
    sct.tl.gene_graph(
        adata, model, score="attention", top_k=adata.n_vars - 1, min_cells=1, layers="all", heads="mean"
    )
    graph = adata.varp["sct_gene_graph"]
    assert sp.issparse(graph) and graph.format == "csr" and graph.shape == (adata.n_vars, adata.n_vars)
    changed = {k for k in fingerprint(adata) if fingerprint(adata).get(k) != before.get(k)}
    assert changed == {"varp/sct_gene_graph", "uns"}
    params = adata.uns["sct"]["sct_gene_graph"]["params"]
    assert params["normalize"] == "coexpression" and params["layers"] == "all" and params["symmetrize"]
    assert params["score"] == "attention"

    # naive: one cell at a time, attention maps of every layer, loops over token pairs
    n = adata.n_vars
    total, together = np.zeros((n, n)), np.zeros((n, n))
    for ids, full in per_cell_attention(model, adata):
        p = model.module.n_prefix
        attention = full[p:, p:]
        for i, gi in enumerate(ids):
            for j, gj in enumerate(ids):
                if i != j:
                    total[gi, gj] += attention[i, j] * len(ids)
                    together[gi, gj] += 1
    expected = np.divide((total + total.T) / 2, together, out=np.zeros((n, n)), where=together > 0)
    np.testing.assert_allclose(graph.toarray(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(graph.toarray(), graph.toarray().T)


def naive_co_attention(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation of the columns of a dense cells x genes matrix, and co-presence counts, by loops."""
    n_cells, n_genes = weights.shape
    score, together = np.zeros((n_genes, n_genes)), np.zeros((n_genes, n_genes))
    for i in range(n_genes):
        for j in range(n_genes):
            a, b = weights[:, i], weights[:, j]
            together[i, j] = sum(1 for c in range(n_cells) if a[c] != 0 and b[c] != 0)
            covariance = sum((a[c] - a.mean()) * (b[c] - b.mean()) for c in range(n_cells)) / n_cells
            if a.std() > 0 and b.std() > 0:
                score[i, j] = covariance / (a.std() * b.std())
    return score, together


def test_co_attention_accumulator_matches_a_naive_correlation_over_cells():
    rng = np.random.default_rng(1)
    n_genes, n_cells, length = 6, 30, 4
    genes = np.full((n_cells, length), -1)
    weights = np.zeros((n_cells, n_genes))
    attention = rng.random((n_cells, length)).astype(np.float32)
    for c in range(n_cells):
        n = rng.integers(0, length + 1)
        genes[c, :n] = rng.choice(np.r_[np.arange(n_genes), -2], size=n, replace=False)
        for slot in range(n):
            if genes[c, slot] >= 0:
                weights[c, genes[c, slot]] = attention[c, slot]
    accumulator = CoAttentionAccumulator(n_genes)
    for part in (slice(0, 11), slice(11, None)):  # two minibatches
        accumulator.add(torch.as_tensor(genes[part]), torch.as_tensor(attention[part]))
    score, together = naive_co_attention(weights)
    np.fill_diagonal(score, 0)

    graph = accumulator.graph(n_genes - 1, min_cells=1).toarray()
    np.testing.assert_allclose(graph, np.where(score > 0, score, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(graph, graph.T)
    # min_cells, then each gene's strongest positive correlations (kept if in either gene's top 2)
    graph = accumulator.graph(2, min_cells=4).toarray()
    score[together < 4] = 0
    for i in range(n_genes):
        expected = sorted(score[i][score[i] > 0], reverse=True)[:2]
        assert all(np.isclose(graph[i], value, rtol=1e-5).any() for value in expected)
        assert set(np.flatnonzero(graph[i])) <= set(np.flatnonzero(score[i] > 0))
    for top_k in (0, -2, 2.5, True):  # as tl.gene_graph refuses them
        with pytest.raises(ValueError, match="top_k must be a positive integer"):
            accumulator.graph(top_k, min_cells=1)


def test_co_attention_graph_equals_the_cls_attention_of_each_cell_correlated_by_hand(trained):
    model, data = trained
    adata = data[:40].copy()
    sct.tl.gene_graph(adata, model, score="co-attention", top_k=adata.n_vars - 1, min_cells=1, layers="all")
    graph = adata.varp["sct_gene_graph"].toarray()
    params = adata.uns["sct"]["sct_gene_graph"]["params"]
    assert params["score"] == "co-attention" and "normalize" not in params

    weights = np.zeros((adata.n_obs, adata.n_vars))
    for c, (ids, full) in enumerate(per_cell_attention(model, adata)):  # the [CLS] row of each cell
        weights[c, ids] = full[0, model.module.n_prefix :][: len(ids)]
    expected, _ = naive_co_attention(weights)
    np.fill_diagonal(expected, 0)
    assert (graph > 0).sum() > adata.n_vars  # a graph with edges, not an empty one
    np.testing.assert_allclose(graph, np.where(expected > 0, expected, 0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="score must be"):
        sct.tl.gene_graph(adata, model, score="cls")


def test_default_layers_are_the_first_for_co_attention_and_the_last_for_attention():
    adata = sct.datasets.synthetic(n_cells=60, n_genes=30, n_cell_types=3, n_markers=5, seed=2)
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **{**TINY, "n_layers": 2})  # two blocks: first != last
    options = {"top_k": adata.n_vars - 1, "min_cells": 1, "copy": True}
    for score, default, other in (("co-attention", 0, "last"), ("attention", "last", 0)):
        graph = sct.tl.gene_graph(adata, model, score=score, **options)
        chosen = sct.tl.gene_graph(adata, model, score=score, layers=default, **options)
        not_chosen = sct.tl.gene_graph(adata, model, score=score, layers=other, **options)
        key = "sct_gene_graph"
        assert graph.uns["sct"][key]["params"]["layers"] == ("first" if default == 0 else "last")
        np.testing.assert_array_equal(graph.varp[key].toarray(), chosen.varp[key].toarray())
        assert not np.allclose(graph.varp[key].toarray(), not_chosen.varp[key].toarray())
    first = sct.tl.gene_graph(adata, model, layers="first", **options).varp["sct_gene_graph"].toarray()
    block_0 = sct.tl.gene_graph(adata, model, layers=[0], **options).varp["sct_gene_graph"].toarray()
    assert first.any()
    np.testing.assert_array_equal(first, block_0)


def test_gene_graph_by_group_and_restricted_genes(trained, tmp_path):
    model, data = trained
    adata = data.copy()
    small = adata.obs["cell_type"] == "type_2"
    adata = adata[~small | (np.cumsum(small) <= 5)].copy()  # type_2 keeps 5 cells
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.rename_categories({"type_1": "CD4+/CD25 T"})
    with pytest.warns(UserWarning, match="type_2.*5 cells"):
        sct.tl.gene_graph(adata, model, groupby="cell_type", min_group_size=20, top_k=3)
    assert {"sct_gene_graph_type_0", "sct_gene_graph_CD4+_CD25 T"} <= set(adata.varp)  # "/" not in h5ad keys
    assert "sct_gene_graph_type_2" not in adata.varp
    runs = adata.uns["sct"]
    assert (
        runs["sct_gene_graph_CD4+_CD25 T"]["params"]["group"] == "CD4+/CD25 T"
        and "sct_gene_graph" not in runs
    )
    adata.write_h5ad(tmp_path / "graphs.h5ad")
    # the ungrouped graph keeps its record; a grouped re-run replaces the groups' graphs
    sct.tl.gene_graph(adata, model, top_k=3)
    with pytest.warns(UserWarning, match="type_0.*43 cells"):
        sct.tl.gene_graph(adata, model, groupby="cell_type", min_group_size=45, top_k=2)
    kept = [k for k in adata.varp if k.startswith("sct_gene_graph")]
    assert sorted(kept) == ["sct_gene_graph", "sct_gene_graph_CD4+_CD25 T"], kept  # type_0: < 45 cells
    assert adata.uns["sct"]["sct_gene_graph"]["params"].get("groupby") is None
    assert adata.uns["sct"]["sct_gene_graph_CD4+_CD25 T"]["params"]["top_k"] == 2
    assert "sct_gene_graph_type_0" not in adata.uns["sct"]

    genes = list(adata.var_names[:10])
    sct.tl.gene_graph(adata, model, genes=genes, top_k=3, key_added="small")
    graph = adata.varp["small"].tocoo()
    assert set(graph.row) | set(graph.col) <= set(range(10))
    assert graph.nnz > 0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"top_k": 0}, ValueError, "top_k"),
        ({"top_k": 60}, ValueError, "top_k"),
        ({"genes": ["gene_0", "CD3E"]}, KeyError, "CD3E"),
        ({"layers": 5}, ValueError, "layers"),
        ({"heads": "sum"}, ValueError, "heads"),
        ({"normalize": "pmi"}, ValueError, "normalize"),
        ({"min_cells": 0}, ValueError, "min_cells"),
        ({"groupby": "nope"}, KeyError, "nope"),
        ({"groupby": "cell_type", "min_group_size": 10_000}, ValueError, "min_group_size"),
        ({"groupby": "cell_type", "min_group_size": None}, ValueError, "min_group_size must be a positive"),
        ({"groupby": "cell_type", "min_group_size": "10"}, ValueError, "min_group_size must be a positive"),
        ({"groupby": "cell_type", "min_group_size": -5}, ValueError, "min_group_size must be a positive"),
        ({"groupby": "cell_type", "min_group_size": 0}, ValueError, "min_group_size must be a positive"),
        ({"groupby": "cell_type", "min_group_size": 2.5}, ValueError, "min_group_size must be a positive"),
        ({"groupby": ["cell_type"]}, TypeError, r"groupby must be the name of one column"),
        ({"min_cells": 151}, ValueError, r"min_cells=151 is more than the 150 cells"),
        ({"score": "attention", "symmetrize": "no"}, TypeError, "symmetrize must be True or False"),
    ],
)
def test_gene_graph_refuses_bad_arguments_before_any_work(trained, kwargs, error, message):
    model, data = trained
    adata = data.copy()
    before = fingerprint(adata)
    with pytest.raises(error, match=message), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the too-small groups' warnings
        sct.tl.gene_graph(adata, model, **kwargs)
    assert fingerprint(adata) == before


def test_gene_embedding_identity_and_contextual(trained):
    model, data = trained
    adata = data[:50, ::-1].copy()  # another gene order
    sct.tl.gene_embedding(adata, model)
    table = model.module.gene_embedding.weight.detach().numpy()
    ids = model._column_to_gene(adata)
    np.testing.assert_array_equal(adata.varm["sct_gene_embedding"], table[ids])
    assert adata.var["sct_gene_embedding_defined"].all()

    sct.tl.gene_embedding(adata, model, kind="contextual", batch_size=7)
    contextual = adata.varm["sct_gene_embedding_contextual"]
    # naive: mean of the gene's final hidden state over the cells where it is a token
    sums, counts = np.zeros_like(contextual, dtype=np.float64), np.zeros(adata.n_vars)
    column_of = {int(g): c for c, g in enumerate(ids)}
    for _, tokens, hidden in model._forward(adata, 50):
        h = hidden[:, model.module.n_prefix :].numpy()
        for c in range(h.shape[0]):
            for t in np.flatnonzero(tokens.is_token[c].numpy()):
                sums[column_of[int(tokens.gene_ids[c, t])]] += h[c, t]
                counts[column_of[int(tokens.gene_ids[c, t])]] += 1
    seen = counts > 0
    np.testing.assert_allclose(contextual[seen], (sums[seen] / counts[seen, None]), rtol=1e-4, atol=1e-5)
    assert (adata.var["sct_gene_embedding_contextual_defined"].to_numpy() == seen).all()
    assert np.all(contextual[~seen] == 0)

    other = adata.copy()
    other.var_names = [*other.var_names[:-2], "NEW1", "NEW2"]
    with pytest.warns(UserWarning, match="2 genes have no identity embedding"):
        sct.tl.gene_embedding(other, model)
    assert not other.var["sct_gene_embedding_defined"].iloc[-2:].any()


def test_gene_modules_are_leiden_communities_with_cell_scores(graphed):
    _, with_graph = graphed
    adata = with_graph.copy()
    sct.tl.gene_modules(adata, resolution=1.0, min_size=3)
    module = adata.var["sct_gene_module"]
    assert isinstance(module.dtype, pd.CategoricalDtype) and len(module.cat.categories) >= 2
    sizes = module.value_counts()
    assert (sizes >= 3).all() and list(sizes[module.cat.categories]) == sorted(sizes, reverse=True)
    scores = adata.obsm["sct_gene_module_scores"]
    assert list(scores.columns) == list(module.cat.categories) and scores.shape[0] == adata.n_obs
    # a module score is the mean expression of its genes less that of control genes
    first = module.cat.categories[0]
    members = list(adata.var_names[module == first])
    expected = sc.tl.score_genes(
        adata, members, ctrl_size=min(50, adata.n_vars - len(members)), random_state=0, copy=True
    ).obs["score"]
    np.testing.assert_allclose(scores[first], expected)

    with pytest.raises(KeyError, match=r"run sct\.tl\.gene_graph"):
        sct.tl.gene_modules(adata, key="missing")
    # a run without scores leaves no scores of the earlier modules under the same names
    sct.tl.gene_modules(adata, resolution=3.0, min_size=3, score=False)
    assert "sct_gene_module_scores" not in adata.obsm


def test_empty_graphs_warn_and_modules_that_would_be_empty_are_refused(trained):
    model, data = trained
    adata = data.copy()
    adata.obs["size"] = np.where(np.arange(adata.n_obs) < 144, "big", "small")
    with pytest.warns(UserWarning, match=r"graph of group 'small' of 'size' \(6 cells\) has no edges"):
        sct.tl.gene_graph(adata, model, groupby="size", min_group_size=1, min_cells=10, top_k=5)
    assert adata.varp["sct_gene_graph_small"].nnz == 0 and adata.varp["sct_gene_graph_big"].nnz > 0
    sct.tl.gene_modules(adata, key="sct_gene_graph_big", min_size=3, random_state=1, score=False)
    before = adata.var["sct_gene_module"].copy()
    assert adata.uns["sct"]["sct_gene_module"]["params"]["random_state"] == 1
    assert adata.uns["sct"]["sct_gene_module"]["params"]["score"] is False
    with pytest.raises(ValueError, match=r"no module .* has min_size=1000 genes \(the largest has \d+\)"):
        sct.tl.gene_modules(adata, key="sct_gene_graph_big", min_size=1000)
    pd.testing.assert_series_equal(adata.var["sct_gene_module"], before)  # the earlier modules stay


def test_a_grouped_rerun_removes_its_earlier_graphs_but_not_other_tools_records(trained):
    model, data = trained
    adata = data.copy()
    settings = {"key_added": "g", "top_k": 5, "min_cells": 2, "min_group_size": 10}
    sct.tl.gene_graph(adata, model, groupby="cell_type", **settings)
    sct.tl.gene_modules(adata, key="g_type_0", key_added="g_type_0", score=False)  # its record on top
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the batches' graphs
        sct.tl.gene_graph(adata, model, groupby="batch", **settings)
    assert sorted(adata.varp) == sorted(f"g_{b}" for b in adata.obs["batch"].unique())  # no type_* left
    assert (
        adata.uns["sct"]["g_type_0"]["function"] == "gene_modules"
        and "others" not in adata.uns["sct"]["g_type_0"]
    )
    assert "g_type_1" not in adata.uns["sct"]
    assert "g_type_0" in adata.var  # gene_modules' output is not the graph's to remove


def test_gene_graph_refuses_groups_whose_varp_keys_would_clash(trained):
    model, data = trained
    adata = data.copy()
    adata.obs["group"] = np.where(np.arange(adata.n_obs) % 2 == 0, "CD4/CD8", "CD4_CD8")
    before = fingerprint(adata)
    with pytest.raises(ValueError, match=r"share a \.varp key.*CD4/CD8.*CD4_CD8"):
        sct.tl.gene_graph(adata, model, groupby="group", top_k=3)
    assert fingerprint(adata) == before


def test_gene_graph_refuses_labels_of_mixed_types_that_share_a_varp_key_before_any_work(trained):
    """1 and "1" are two groups of an object column, but both would be .varp["sct_gene_graph_1"]."""
    model, data = trained
    adata = data.copy()
    adata.obs["group"] = pd.Series(
        [1 if i % 2 == 0 else "1" for i in range(adata.n_obs)], index=adata.obs_names, dtype=object
    )
    before = fingerprint(adata)
    with (
        mock.patch.object(model, "_gene_attention", side_effect=AssertionError("computed")),
        pytest.raises(
            ValueError, match=r"share a \.varp key.*1 and '1' -> 'sct_gene_graph_1'.*astype\(str\)"
        ),
    ):
        sct.tl.gene_graph(adata, model, groupby="group", top_k=3, min_group_size=10)
    assert fingerprint(adata) == before and "sct" not in adata.uns
    # the fix the message gives: one group of every cell
    adata.obs["group"] = adata.obs["group"].astype(str)
    sct.tl.gene_graph(adata, model, groupby="group", top_k=3, min_group_size=10)
    assert [k for k in adata.varp if k.startswith("sct_gene_graph")] == ["sct_gene_graph_1"]
    assert adata.uns["sct"]["sct_gene_graph_1"]["params"]["group"] == "1"


def test_graph_and_modules_work_with_duplicate_var_names_under_gene_key():
    """A model set up with gene_key allows duplicate var_names (symbols); genes are placed by position."""
    data = sct.datasets.synthetic(n_cells=120, n_genes=40, n_cell_types=3, n_markers=6, seed=4)
    data.var["ensembl"] = [f"ENSG{i:05d}" for i in range(data.n_vars)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata: var_names not unique
        data.var_names = [*data.var_names[:-2], "gene_5", "gene_5"]  # gene_5 names three columns
    sct.setup_anndata(data, layer="counts", gene_key="ensembl")
    model = sct.GeneTransformer(data, **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, batch_size=32, **QUIET)
        sct.tl.gene_graph(data, model, top_k=4, min_cells=1)
    unique = data.copy()
    unique.var_names = data.var["ensembl"].to_numpy()
    sct.tl.gene_graph(unique, model, top_k=4, min_cells=1)
    np.testing.assert_array_equal(
        data.varp["sct_gene_graph"].toarray(), unique.varp["sct_gene_graph"].toarray()
    )

    for adata in (data, unique):
        sc.pp.normalize_total(adata, layer=None)
        sc.pp.log1p(adata)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sct.tl.gene_modules(adata, min_size=2)
    np.testing.assert_array_equal(
        data.var["sct_gene_module"].to_numpy(), unique.var["sct_gene_module"].to_numpy()
    )
    pd.testing.assert_frame_equal(
        data.obsm["sct_gene_module_scores"], unique.obsm["sct_gene_module_scores"], check_names=False
    )

    small = data.copy()
    sct.tl.gene_graph(small, model, genes=["gene_1", "gene_2", "gene_3"], top_k=1, min_cells=1, key_added="s")
    rows = small.varp["s"].tocoo()
    assert set(rows.row) | set(rows.col) <= {1, 2, 3}
    with pytest.raises(ValueError, match=r"more than one column.*gene_5"):
        sct.tl.gene_graph(small, model, genes=["gene_1", "gene_5"], top_k=1)


def test_a_module_of_nearly_every_gene_is_scored_with_a_warning(graphed):
    _, with_graph = graphed
    adata = with_graph.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # whether the control genes need wider bins depends on the draw
        sct.tl.gene_modules(adata, resolution=1e-4, min_size=2)  # one module of every connected gene
    module = adata.var["sct_gene_module"]
    assert len(module.cat.categories) == 1 and (module == "M0").sum() > adata.n_vars // 2
    scores = adata.obsm["sct_gene_module_scores"]["M0"]
    assert scores.notna().all() and scores.std() > 0

    # scanpy finds no control gene in the members' 25 expression bins: 2 wide bins, with a warning
    from sctransformer.tl._gene_graph import _module_score

    rng = np.random.default_rng(0)
    light = sc.AnnData(rng.poisson(rng.uniform(0.1, 5, size=40), size=(80, 40)).astype(np.float32))
    light.var_names = [str(i) for i in range(40)]
    middle = str(int(np.argsort(np.asarray(light.X.mean(0)))[20]))
    members = [g for g in light.var_names if g != middle]
    with pytest.warns(UserWarning, match="2 wide expression bins"):
        scores = _module_score(light, members, "M0", random_state=0)
    x = np.asarray(light.X)
    expected = x[:, [int(g) for g in members]].mean(1) - x[:, int(middle)]  # the one control gene
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    with pytest.warns(UserWarning, match="no score"):
        assert np.isnan(_module_score(light, list(light.var_names), "M1", random_state=0)).all()


def test_key_added_with_a_slash_is_refused_before_any_work(graphed):
    """'/' in a .varp/.varm/.uns key makes the written .h5ad unreadable."""
    model, with_graph = graphed
    adata = with_graph.copy()
    before = fingerprint(adata)
    with pytest.raises(ValueError, match="without '/'"):
        sct.tl.gene_graph(adata, model, top_k=3, key_added="pbmc/graph")
    with pytest.raises(ValueError, match="without '/'"):
        sct.tl.gene_embedding(adata, model, key_added="emb/id")
    with pytest.raises(ValueError, match="without '/'"):
        sct.tl.gene_modules(adata, key_added="modules/v1")
    assert fingerprint(adata) == before


@pytest.mark.parametrize("key", ["", "   "])
def test_an_empty_or_blank_key_added_is_refused_before_any_work(graphed, key):
    """An empty key makes the written .h5ad unreadable; a blank one names nothing visible."""
    model, with_graph = graphed
    adata = with_graph.copy()
    before = fingerprint(adata)
    message = r"key_added must be a string without '/', neither empty nor blank.*got " + repr(key)
    with mock.patch.object(model, "_gene_attention", side_effect=AssertionError("computed")):
        with pytest.raises(ValueError, match=message):
            sct.tl.gene_graph(adata, model, top_k=3, key_added=key)
    with pytest.raises(ValueError, match=message):
        sct.tl.gene_embedding(adata, model, key_added=key)  # not replaced by the default key
    with pytest.raises(ValueError, match=message):
        sct.tl.gene_modules(adata, key_added=key)
    assert fingerprint(adata) == before


def test_module_scores_of_raw_counts_in_x_warn_with_the_fix(graphed):
    _, with_graph = graphed
    adata = with_graph.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # log-normalised X: no warning
        sct.tl.gene_modules(adata, min_size=3)
    adata.X = adata.layers["counts"].copy()
    with pytest.warns(UserWarning, match=r"adata.X looks like raw counts.*sc.pp.normalize_total"):
        sct.tl.gene_modules(adata, min_size=3)
    with pytest.warns(UserWarning, match=r"adata.X looks like raw counts"):
        sct.pl.gene_modules(adata, groupby="cell_type", show=False)


def test_gene_modules_refuses_to_score_a_backed_adata(graphed, tmp_path, monkeypatch):
    """scanpy cannot score a backed X; that is not 'no control genes' (all-NaN scores)."""
    import anndata as ad

    _, with_graph = graphed
    with_graph.write_h5ad(tmp_path / "graph.h5ad")
    backed = ad.read_h5ad(tmp_path / "graph.h5ad", backed="r+")
    try:
        with pytest.raises(ValueError, match=r"backed.*to_memory\(\).*score=False"):
            sct.tl.gene_modules(backed)
        assert "sct_gene_module" not in backed.var
        sct.tl.gene_modules(backed, score=False)  # the modules need no X
        assert "sct_gene_module" in backed.var
    finally:
        backed.file.close()

    # only scanpy's "no control genes" falls back; other errors of score_genes propagate
    from sctransformer.tl._gene_graph import _module_score

    def not_implemented(*args, **kwargs):
        raise NotImplementedError("not for this matrix")

    monkeypatch.setattr(sc.tl, "score_genes", not_implemented)
    light = sc.AnnData(np.ones((4, 4), dtype=np.float32))
    with pytest.raises(NotImplementedError):
        _module_score(light, ["0", "1"], "M0", random_state=0)


def test_gene_modules_with_an_empty_x_says_what_it_needs(graphed):
    _, with_graph = graphed
    adata = with_graph.copy()
    adata.X = None
    with pytest.raises(ValueError, match=r"log-normalised.*adata\.X.*score=False"):
        sct.tl.gene_modules(adata)
    sct.tl.gene_modules(adata, score=False)
    assert "sct_gene_module" in adata.var


def test_grouped_gene_graph_on_a_view_leaves_the_parent_alone(trained):
    model, data = trained
    adata = data.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sct.tl.gene_graph(adata, model, top_k=3, groupby="cell_type", min_group_size=5)
    keys = sorted(adata.uns["sct"])
    assert "sct_gene_graph_type_1" in keys
    before = fingerprint(adata)
    view = adata[adata.obs["cell_type"] != "type_1"]
    sct.tl.gene_graph(view, model, top_k=2, groupby="cell_type", min_group_size=5)
    assert "sct_gene_graph_type_1" not in view.uns["sct"] and "sct_gene_graph_type_1" not in view.varp
    assert sorted(adata.uns["sct"]) == keys and fingerprint(adata) == before
    assert all(adata.uns["sct"][k]["params"]["top_k"] == 3 for k in keys)


def test_gene_graph_records_its_genes_writably(trained, tmp_path):
    import anndata as ad

    model, data = trained
    adata = data.copy()
    genes = list(adata.var_names[:10])
    sct.tl.gene_graph(adata, model, top_k=3, genes=genes, key_added="sub")
    assert list(adata.uns["sct"]["sub"]["genes"]) == genes
    adata.write_h5ad(tmp_path / "sub.h5ad")
    assert list(ad.read_h5ad(tmp_path / "sub.h5ad").uns["sct"]["sub"]["genes"]) == genes


@pytest.mark.slow
@pytest.mark.parametrize(("score", "bound_gib"), [("attention", 2.3), ("co-attention", 1.0)])
def test_gene_graph_memory_is_bounded_for_20000_genes(tmp_path, score, bound_gib):
    """Peak memory of a 20,000-gene graph: one dense float32 accumulator (co-attention: none), nothing n^2 per batch."""
    script = tmp_path / "big.py"
    script.write_text(
        textwrap.dedent(
            """
            import resource, warnings
            warnings.filterwarnings("ignore")
            import sctransformer as sct
            adata = sct.datasets.synthetic(600, 20_000, n_cell_types=4, n_markers=50, mean_counts=3000)
            sct.setup_anndata(adata, layer="counts")
            model = sct.GeneTransformer(adata, d_model=16, n_layers=1, n_heads=2, max_length=256)
            start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            sct.tl.gene_graph(adata, model, score=SCORE, top_k=10, batch_size=64)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(start / 2**20, peak / 2**20, adata.varp["sct_gene_graph"].nnz)
            """
        ).replace("SCORE", repr(score))
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    start_gib, peak_gib, nnz = (float(v) for v in out.stdout.split()[-3:])
    # the attention accumulator is 20,000^2 float32 = 1.49 GiB; a dense n^2 matrix per batch or a
    # float64 copy of the sum would exceed the bound; co-attention keeps only the cells' rows and
    # 64 MB scoring blocks
    assert peak_gib - start_gib < bound_gib, (start_gib, peak_gib)
    assert nnz > 0
