from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch

import sctransformer as sct
from sctransformer.data import to_torch_csr
from sctransformer.tl import AttentionAccumulator

from ..conftest import fingerprint


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


def test_gene_graph_equals_per_cell_attention_aggregated_by_hand(trained):
    model, data = trained
    adata = data[:40].copy()
    before = fingerprint(adata)
    sct.tl.gene_graph(adata, model, top_k=adata.n_vars - 1, min_cells=1, layers="all", heads="mean")
    graph = adata.varp["sct_gene_graph"]
    assert sp.issparse(graph) and graph.format == "csr" and graph.shape == (adata.n_vars, adata.n_vars)
    changed = {k for k in fingerprint(adata) if fingerprint(adata).get(k) != before.get(k)}
    assert changed == {"varp/sct_gene_graph", "uns"}
    params = adata.uns["sct"]["sct_gene_graph"]["params"]
    assert params["normalize"] == "coexpression" and params["layers"] == "all" and params["symmetrize"]

    # naive: one cell at a time, attention maps of every layer, loops over token pairs
    module = model.module.eval()
    column_to_gene = torch.as_tensor(model._column_to_gene(adata))
    vocabulary_to_column = {int(g): c for c, g in enumerate(column_to_gene) if g >= 0}
    n = adata.n_vars
    total, together = np.zeros((n, n)), np.zeros((n, n))
    for c in range(adata.n_obs):
        x = to_torch_csr(sp.csr_matrix(adata.layers["counts"][c]))
        with torch.no_grad():
            tokens = module.tokenize(x, column_to_gene)
            _, maps = module.encode_with_attention(
                tokens, torch.full((1, module.n_phenotypes), -1), list(range(len(module.blocks)))
            )
        p = module.n_prefix
        attention = np.mean([m[0].mean(0)[p:, p:].numpy() for m in maps], axis=0)
        ids = [vocabulary_to_column[int(g)] for g in tokens.gene_ids[0][tokens.is_token[0]]]
        for i, gi in enumerate(ids):
            for j, gj in enumerate(ids):
                if i != j:
                    total[gi, gj] += attention[i, j] * len(ids)
                    together[gi, gj] += 1
    expected = np.divide((total + total.T) / 2, together, out=np.zeros((n, n)), where=together > 0)
    np.testing.assert_allclose(graph.toarray(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(graph.toarray(), graph.toarray().T)


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
    assert adata.uns["sct"]["sct_gene_graph"]["params"]["groups"] == ["type_0", "CD4+/CD25 T"]
    adata.write_h5ad(tmp_path / "graphs.h5ad")

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


def test_gene_modules_are_leiden_communities_with_cell_scores(trained):
    model, data = trained
    adata = data.copy()
    sct.tl.gene_graph(adata, model, top_k=5)
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
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


@pytest.mark.slow
def test_gene_graph_memory_is_bounded_for_20000_genes(tmp_path):
    """Peak memory of a 20,000-gene graph: one dense float32 accumulator, nothing n^2 per batch."""
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
            sct.tl.gene_graph(adata, model, top_k=10, batch_size=64)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(start / 2**20, peak / 2**20, adata.varp["sct_gene_graph"].nnz)
            """
        )
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    start_gib, peak_gib, nnz = (float(v) for v in out.stdout.split()[-3:])
    # the accumulator is 20,000^2 float32 = 1.49 GiB; a dense n^2 matrix per batch or a float64
    # copy of the sum would exceed the bound
    assert peak_gib - start_gib < 2.3, (start_gib, peak_gib)
    assert nnz > 0
