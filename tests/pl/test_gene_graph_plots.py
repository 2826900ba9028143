from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import warnings
from unittest import mock

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

import sctransformer as sct

from ..conftest import fingerprint


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def with_graph(graphed):
    model, graph = graphed
    adata = graph.copy()
    sct.tl.gene_modules(adata, score=False)
    return model, adata


def test_gene_graph_plot_draws_each_gene_with_its_strongest_edges(with_graph):
    _, adata = with_graph
    before = fingerprint(adata)
    ax = sct.pl.gene_graph(adata, ["gene_0", "gene_8"], n_neighbors=3, show=False)
    assert isinstance(ax, Axes)
    labels = {t.get_text() for t in ax.texts}
    graph = sp.csr_matrix(adata.varp["sct_gene_graph"])
    for gene in ("gene_0", "gene_8"):
        row = graph.getrow(adata.var_names.get_loc(gene))
        strongest = set(adata.var_names[row.indices[np.argsort(-row.data)[:3]]])
        assert {gene, *strongest} <= labels
    assert fingerprint(adata) == before
    with pytest.raises(KeyError, match="NOTAGENE"):
        sct.pl.gene_graph(adata, ["gene_0", "NOTAGENE"], show=False)
    with pytest.raises(KeyError, match="run sct"):
        sct.pl.gene_graph(adata, ["gene_0"], key="missing", show=False)


def test_a_directed_graph_is_drawn_with_arrows_and_each_genes_own_scores():
    adata = ad.AnnData(np.zeros((3, 3), dtype=np.float32), var=pd.DataFrame(index=["a", "b", "c"]))
    adata.varp["sct_gene_graph"] = sp.csr_matrix(np.array([[0, 1.0, 0], [3.0, 0, 0], [0, 0, 0]], np.float32))
    with mock.patch("networkx.draw_networkx_edges") as draw:
        sct.pl.gene_graph(adata, ["a", "b"], n_neighbors=1, show=False)
    network = draw.call_args.args[0]
    assert network.is_directed() and draw.call_args.kwargs["arrows"]
    assert {(u, v, d["weight"]) for u, v, d in network.edges(data=True)} == {
        (0, 1, 1.0),
        (1, 0, 3.0),
    }
    adata.varp["sct_gene_graph"] = sp.csr_matrix(np.array([[0, 2.0, 0], [2.0, 0, 0], [0, 0, 0]], np.float32))
    with mock.patch("networkx.draw_networkx_edges") as draw:
        sct.pl.gene_graph(adata, ["a", "b"], n_neighbors=1, show=False)
    assert not draw.call_args.args[0].is_directed() and not draw.call_args.kwargs["arrows"]


def test_attention_plot_shows_one_cells_token_attention(with_graph):
    model, adata = with_graph
    fig = sct.pl.attention(adata, model, cell=adata.obs_names[3], n_genes=8, return_fig=True)
    assert isinstance(fig, Figure)
    image = fig.axes[0].images[0].get_array()
    (_, _, attention), *_ = list(model._gene_attention(adata[[3]], batch_size=1))
    np.testing.assert_allclose(image, attention[0, :8, :8].numpy())
    assert image.sum(1).max() <= 1 + 1e-5  # rows are (parts of) probability distributions
    with pytest.raises(ValueError, match="cell must be"):
        sct.pl.attention(adata, model, cell=10_000, show=False)
    logged = adata.copy()
    logged.layers["counts"] = logged.X.copy()  # log-normalised values where counts belong
    with pytest.raises(ValueError, match="non-integer"):
        sct.pl.attention(logged, model, cell=3, show=False)


def test_gene_modules_dotplot_has_one_column_per_module(with_graph):
    _, adata = with_graph
    dotplot = sct.pl.gene_modules(adata, "cell_type", return_fig=True)
    assert list(dotplot.var_names) == list(adata.var["sct_gene_module"].cat.categories)
    with pytest.raises(KeyError, match="gene_modules"):
        sct.pl.gene_modules(adata, "cell_type", key="missing", show=False)
    for numbers in (adata.obs["cell_type"].cat.codes.astype(int), adata.obs["cell_type"] == "type_0"):
        adata.obs["grouping"] = numbers.to_numpy()  # integers, booleans: one row per value, not bins
        rows = sct.pl.gene_modules(adata, "grouping", return_fig=True).obs_tidy.index.categories
        assert sorted(map(str, rows)) == sorted(map(str, np.unique(numbers)))
    del adata.obs["grouping"]


def test_gene_graph_plot_refuses_genes_outside_the_graph(trained):
    model, data = trained
    extra = sp.csr_matrix(np.random.default_rng(3).poisson(2, (data.n_obs, 2)).astype(np.float32))
    counts = sp.hstack([data.layers["counts"], extra]).tocsr()
    adata = ad.AnnData(
        X=counts.copy(),
        obs=data.obs.copy(),
        var=pd.DataFrame(index=[*data.var_names, "CD3E", "MS4A1"]),
        layers={"counts": counts},
    )
    sct.tl.gene_graph(adata, model, top_k=3)
    with pytest.raises(ValueError, match=r"not in the graph.*CD3E.*MS4A1"):
        sct.pl.gene_graph(adata, ["gene_0", "CD3E", "MS4A1"], show=False)
    sct.tl.gene_graph(adata, model, top_k=3, genes=[f"gene_{i}" for i in range(10)], key_added="sub")
    with pytest.raises(ValueError, match=r"not in the graph.*gene_20"):
        sct.pl.gene_graph(adata, ["gene_0", "gene_20"], key="sub", show=False)
    sct.pl.gene_graph(adata, ["gene_0", "gene_9"], key="sub", show=False)
    # a graph written without the record of its genes: drawn as before
    del adata.uns["sct"]["sub"]["genes"]
    ax = sct.pl.gene_graph(adata, ["gene_0", "gene_20"], key="sub", show=False)
    assert "gene_20" in ax.get_title()


def test_gene_graph_plot_refuses_ambiguous_var_names(with_graph):
    _, graph = with_graph
    adata = graph.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata: var_names not unique
        adata.var_names = [*adata.var_names[:-1], "gene_0"]
    with pytest.raises(ValueError, match=r"more than one column.*gene_0"):
        sct.pl.gene_graph(adata, ["gene_0"], show=False)
    sct.pl.gene_graph(adata, ["gene_1"], show=False)


def test_gene_modules_plot_with_an_empty_x_says_what_it_needs(with_graph):
    _, graph = with_graph
    adata = graph.copy()
    adata.X = None
    with pytest.raises(ValueError, match=r"log-normalised.*adata\.X") as error:
        sct.pl.gene_modules(adata, "cell_type", show=False)
    assert "score=False" not in str(error.value)  # an option of sct.tl.gene_modules, not of the plot


def test_gene_modules_plot_of_a_backed_adata_says_to_load_it_not_to_skip_scores(with_graph, tmp_path):
    _, graph = with_graph
    graph.write_h5ad(tmp_path / "modules.h5ad")
    backed = ad.read_h5ad(tmp_path / "modules.h5ad", backed="r")
    try:
        with pytest.raises(ValueError, match=r"sct\.pl\.gene_modules.*backed.*to_memory\(\)$") as error:
            sct.pl.gene_modules(backed, "cell_type", show=False)
        assert "score=False" not in str(error.value)
    finally:
        backed.file.close()


def test_gene_graph_plot_draws_neighbours_that_share_a_name_as_separate_nodes():
    """Duplicate var_names (allowed under gene_key): each column is its own node, with its own edge."""
    names = ["A", "DUP", "DUP", "DUP", "B"]
    weights = {1: 0.9, 2: 0.5, 3: 0.2, 4: 0.1}  # A's edges, by column
    graph = sp.lil_matrix((5, 5), dtype=np.float32)
    for j, w in weights.items():
        graph[0, j] = graph[j, 0] = w
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata: var_names not unique
        adata = ad.AnnData(
            X=np.zeros((2, 5), np.float32), var=pd.DataFrame(index=names), varp={"g": graph.tocsr()}
        )
    ax = sct.pl.gene_graph(adata, "A", key="g", n_neighbors=3, show=False)
    assert sorted(t.get_text() for t in ax.texts) == ["A", "DUP", "DUP", "DUP"]
    (edges,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert len(edges.get_paths()) == 3  # one edge per neighbour column
    expected = [0.5 + 3 * w / 0.9 for w in (0.9, 0.5, 0.2)]  # width grows with each column's own score
    np.testing.assert_allclose(sorted(edges.get_linewidths(), reverse=True), expected, rtol=1e-6)


def test_attention_plot_refuses_an_obs_name_of_several_cells(with_graph):
    model, graph = with_graph
    adata = graph[:20].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata: obs_names not unique
        adata.obs_names = [*adata.obs_names[:-1], adata.obs_names[0]]
    name = adata.obs_names[0]
    with (
        mock.patch.object(model, "_gene_attention", side_effect=AssertionError("computed")),
        pytest.raises(
            ValueError, match=rf"obs name '{name}' names 2 cells \(positions 0, 19\); pass a position"
        ),
    ):
        sct.pl.attention(adata, model, cell=name, show=False)
    sct.pl.attention(adata, model, cell=0, n_genes=4, show=False)  # a position still works
