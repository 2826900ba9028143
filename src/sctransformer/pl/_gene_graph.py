"""Plots of gene graphs, one cell's attention and gene modules."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import networkx as nx
import numpy as np
import pandas as pd
import scanpy as sc
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from sctransformer._keys import KEYS
from sctransformer.data._validation import get_matrix, positive_int
from sctransformer.tl._gene_graph import _check_scorable, stored_graph
from sctransformer.tl._utils import previous_run

from ._utils import finish, new_axes

if TYPE_CHECKING:
    from sctransformer.model import GeneTransformer


def gene_graph(
    adata: AnnData,
    genes: list[str] | str,
    *,
    key: str = KEYS.GENE_GRAPH,
    n_neighbors: int = 10,
    layout_seed: int = 0,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | Axes | None:
    """Network of the given genes and their strongest neighbours in a gene graph.

    Each named gene (large, dark nodes) is drawn with its ``n_neighbors`` highest-scoring edges
    in ``.varp[key]`` (:func:`sctransformer.tl.gene_graph`); edge width grows with the score;
    spring layout (networkx), seeded. A graph that is not symmetric (``symmetrize=False``) is
    drawn with arrows from each gene to its neighbours, each with its own score. A node is a column of ``adata``, labelled with its
    ``var_name``: neighbours that share a name (duplicate ``var_names``, allowed with a model set
    up with ``gene_key``) are separate nodes.

    Parameters
    ----------
    adata
        AnnData holding the graph.
    genes
        Gene names (``adata.var_names``) at the centre of the plot.
    key
        ``.varp`` key of the graph.
    n_neighbors
        Edges drawn per named gene.
    layout_seed
        Seed of the spring layout.
    ax, show, return_fig
        As in scanpy.
    """
    graph = stored_graph(adata, key)
    genes = [genes] if isinstance(genes, str) else list(genes)
    if not genes:
        raise ValueError("genes is empty; name at least one gene")
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise KeyError(f"genes not in adata.var_names: {missing}")
    requested = adata.var_names[adata.var_names.isin(genes)]
    ambiguous = sorted(set(requested[requested.duplicated()]))
    if ambiguous:
        raise ValueError(
            f"genes named by more than one column of adata.var_names: {ambiguous[:10]}; "
            "make adata.var_names unique (adata.var_names_make_unique()) to choose among them"
        )
    covered = previous_run(adata, key, "gene_graph").get("genes")
    if covered is not None:  # graphs written before this record have none: no check
        outside = [g for g in genes if g not in set(np.asarray(covered).astype(str))]
        if outside:
            raise ValueError(
                f"genes not in the graph in adata.varp[{key!r}]: {outside[:10]}; it covers only the genes of "
                "adata in the model's vocabulary (or the genes= of sct.tl.gene_graph)"
            )
    n_neighbors = positive_int(n_neighbors, "n_neighbors")
    names = np.asarray(adata.var_names.astype(str))
    # nodes are column positions (var_names may repeat under gene_key); names are only labels
    centres = list(dict.fromkeys(int(np.flatnonzero(adata.var_names == gene)[0]) for gene in genes))
    # an unsymmetrised graph (symmetrize=False) is directed: each gene's own scores, as arrows
    directed = (graph != graph.T).nnz > 0
    network = nx.DiGraph() if directed else nx.Graph()
    for i in centres:
        row = graph.getrow(i)
        network.add_node(i)
        for j in row.indices[np.argsort(-row.data)[:n_neighbors]]:
            network.add_edge(i, int(j), weight=float(graph[i, j]))
    isolated = [names[i] for i in centres if network.degree(i) == 0]
    fig, ax = new_axes(ax, (6, 6))
    position = nx.spring_layout(network, seed=layout_seed, weight="weight")
    weights = np.array([d["weight"] for *_, d in network.edges(data=True)])
    widths = 0.5 + 3 * weights / weights.max() if len(weights) else []
    nx.draw_networkx_edges(network, position, width=widths, edge_color="0.6", arrows=directed, ax=ax)
    others = [n for n in network.nodes if n not in set(centres)]
    nx.draw_networkx_nodes(network, position, nodelist=others, node_size=120, node_color="#9ecae1", ax=ax)
    nx.draw_networkx_nodes(network, position, nodelist=centres, node_size=300, node_color="#08519c", ax=ax)
    nx.draw_networkx_labels(
        network, position, labels={n: names[n] for n in network.nodes}, font_size=8, ax=ax
    )
    title = f"{key}: {n_neighbors} strongest edges per gene"
    if isolated:
        title += f"\n(no edges: {', '.join(isolated)})"
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()
    return finish(fig, ax, show=show, return_fig=return_fig)


def attention(
    adata: AnnData,
    model: GeneTransformer,
    cell: int | str = 0,
    *,
    layers: Literal["first", "last", "all"] | int | list[int] = "last",
    heads: Literal["mean", "max"] = "mean",
    n_genes: int = 30,
    cmap: str = "viridis",
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | Axes | None:
    """Heatmap of one cell's attention among its first ``n_genes`` gene tokens.

    Rows attend to columns: entry ``(i, j)`` is gene ``i``'s attention probability to gene ``j``
    (heads combined by ``heads``, ``layers`` averaged, as in :func:`sctransformer.tl.gene_graph`).
    Genes are in token order (the model's ranking of the cell's genes).

    Parameters
    ----------
    adata
        AnnData with counts in the model's layer.
    model
        Trained :class:`~sctransformer.GeneTransformer`.
    cell
        Position or ``obs_names`` entry of the cell (a name must name one cell only).
    layers, heads
        Which attention, see :func:`sctransformer.tl.gene_graph`.
    n_genes
        Number of gene tokens shown.
    cmap
        Colour map.
    ax, show, return_fig
        As in scanpy.
    """
    if isinstance(cell, str):
        matches = np.flatnonzero(adata.obs_names == cell)
        if len(matches) == 0:
            raise KeyError(f"cell {cell!r} is not in adata.obs_names")
        if len(matches) > 1:
            raise ValueError(
                f"obs name {cell!r} names {len(matches)} cells (positions {', '.join(map(str, matches[:10]))}); "
                "pass a position or make obs_names unique (adata.obs_names_make_unique())"
            )
        cell = int(matches[0])
    if isinstance(cell, bool) or not isinstance(cell, int | np.integer) or not 0 <= cell < adata.n_obs:
        raise ValueError(f"cell must be a position in [0, {adata.n_obs}) or an obs name, got {cell!r}")
    if isinstance(n_genes, bool) or not isinstance(n_genes, int | np.integer) or n_genes < 2:
        raise ValueError(f"n_genes must be an integer >= 2, got {n_genes!r}")
    one = model._inference_adata(adata[[cell]])  # checks the cell's counts, as tl.gene_graph does
    (_, tokens, maps), *_ = list(model._gene_attention(one, layers=layers, heads=heads, batch_size=1))
    n_tokens = int(tokens.is_token[0].sum())
    if n_tokens < 2:
        raise ValueError(f"cell {adata.obs_names[cell]!r} has {n_tokens} gene token(s); nothing to show")
    shown = min(n_genes, n_tokens)
    vocabulary = np.asarray(model.vocabulary_.genes)
    names = vocabulary[tokens.gene_ids[0, :shown].cpu().numpy()]
    matrix = maps[0, :shown, :shown].cpu().numpy()
    fig, ax = new_axes(ax, (0.22 * shown + 2, 0.22 * shown + 1.5))
    image = ax.imshow(matrix, cmap=cmap)
    ax.set_xticks(range(shown), names, rotation=90, fontsize=7)
    ax.set_yticks(range(shown), names, fontsize=7)
    ax.set_xlabel("attended gene")
    ax.set_ylabel("attending gene")
    ax.set_title(f"attention in cell {adata.obs_names[cell]}", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.6, label="attention probability")
    return finish(fig, ax, show=show, return_fig=return_fig)


def gene_modules(
    adata: AnnData,
    groupby: str,
    *,
    key: str = KEYS.GENE_MODULE,
    standard_scale: Literal["var", "group"] | None = "var",
    show: bool | None = None,
    return_fig: bool = False,
    **kwargs,
):
    """Dot plot of gene modules x groups: mean expression of each module's genes per group.

    Uses :func:`scanpy.pl.dotplot` with the genes of each module of ``.var[key]``
    (:func:`sctransformer.tl.gene_modules`) aggregated: a cell's module expression is the mean of
    its module genes in ``adata.X`` (log-normalised expression expected). Dot size: share of cells
    with positive module expression; colour: mean module expression, scaled per module by default.

    Parameters
    ----------
    adata
        AnnData with modules in ``.var[key]``.
    groupby
        ``.obs`` column of the groups (e.g. cell types).
    key
        ``.var`` column of the modules.
    standard_scale
        Scale per module (``"var"``) or per group, as in scanpy.
    show, return_fig
        As in scanpy.
    **kwargs
        More options of :func:`scanpy.pl.dotplot`.
    """
    if key not in adata.var:
        raise KeyError(f"no modules in adata.var[{key!r}]; run sct.tl.gene_modules(adata) first")
    if groupby not in adata.obs:
        raise KeyError(f"groupby={groupby!r} is not a column of adata.obs")
    modules = pd.Categorical(adata.var[key])
    if len(modules.categories) == 0:
        raise ValueError(f"adata.var[{key!r}] holds no module")
    _check_scorable(adata, "sct.pl.gene_modules")  # no alternative: the plot needs X
    x = get_matrix(adata, None)
    columns = []
    for name in modules.categories:
        members = np.flatnonzero(modules == name)
        columns.append(np.asarray(x[:, members].mean(1)).ravel())
    summary = AnnData(
        X=np.column_stack(columns).astype(np.float32),
        # categorical: scanpy would bin numbers or booleans into intervals, then fail to find them
        obs=adata.obs[[groupby]].astype("category"),
        var=pd.DataFrame(index=[str(c) for c in modules.categories]),
    )
    return sc.pl.dotplot(
        summary,
        list(summary.var_names),
        groupby,
        standard_scale=standard_scale,
        show=show,
        return_fig=return_fig,
        **kwargs,
    )
