"""Are attention-graph edges enriched for genes that mark the same cell type? Against co-expression and chance.

For each labelled data set: train sctransformer self-supervised (no labels, default settings;
masked expression only, so the labels that define the marker sets are never seen), build from
it both gene graphs of :func:`sctransformer.tl.gene_graph` over the data set's genes (each score's
default layers, heads averaged, ``--top-k`` edges per gene): gene -> gene attention (``score="attention"``,
co-expression-corrected, symmetrised) and co-attention (``score="co-attention"``, the default:
correlation over cells of the ``[CLS]`` token's attention to each gene; its AUROC scores pairs
of negative correlation 0, as the graph stores only positive ones), and compare each with

- a Pearson co-expression graph on log1p-normalised counts with the same number of edges (each
  gene's top correlations, symmetrised like the attention graph, weakest edges dropped to match);
- a co-detection graph, the same for the correlation over cells of whether each gene is detected (count > 0):
  what a score that only knew which genes are tokens together would give;
- random graphs with exactly the attention graph's degrees (networkx double-edge swaps);
- the same graph from the untrained model (its initial weights, the same seed): what the
  architecture and the input encoding give before anything is learned;
- (AUROC only) the cosine similarity of the model's gene embeddings, identity and contextual.

Marker sets: the top ``--markers`` genes of each cell type by scanpy's ``rank_genes_groups``
(Wilcoxon, on log1p-normalised counts, positive log fold change). A "same-type edge" joins two
markers of one cell type. Printed per data set and graph: edges, same-type edges, enrichment
over the random graphs' mean, and AUROC of the pair scores (every pair of marker genes; label:
same type; attention: co-expression-corrected score, Pearson: correlation; unscored pairs 0).

Data sets: pbmc68k (``bulk_labels``), paul15 (``paul15_celltype``), cellbench (SNG cells,
``cell_line``), kang18 (the 832 labelled cells, ``seurat_annotations_partial``); the last three on
their ``--genes`` most highly variable genes (scanpy ``seurat_v3`` on counts) to keep CPU time in
minutes. papalexi21 has no cell types and pbmc3k no labels: not used.

Usage: python benchmarks/gene_graph.py [--datasets pbmc68k paul15 ...] [--top-k 10] [--genes 1000]
       [--model '<GeneTransformer kwargs JSON>'] [--train '<train kwargs JSON>']
       [--graphs '<list of tl.gene_graph kwargs JSON>']
       python benchmarks/gene_graph.py --memory 20000 [--memory-score attention]
           (peak memory of one 20,000-gene graph)
e.g.   --model '{"cell_profile": false}' --graphs '[{"score": "attention", "normalize": "none"}, {"layers": "all"}]'
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import networkx as nx
import numpy as np
import scanpy as sc
import scipy.sparse as sp
import torch
from sklearn.metrics import roc_auc_score

import sctransformer as sct

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def load(name: str, n_genes: int) -> tuple[ad.AnnData, str]:
    """Counts in X and the label key."""
    if name == "pbmc68k":
        adata = sct.datasets.pbmc68k()
        adata.X = adata.layers.pop("counts")
        return adata, "cell_type"
    if name == "paul15":
        adata, key = ad.read_h5ad(DATA / "paul15_mouse_myeloid_progenitors.h5ad"), "paul15_celltype"
    elif name == "cellbench":
        adata = ad.read_h5ad(DATA / "cellbench_tian19_celllines_5batches.h5ad")
        adata, key = adata[adata.obs["demuxlet_cls"] == "SNG"].copy(), "cell_line"
    elif name == "kang18":
        adata = ad.read_h5ad(DATA / "kang18_ifnb_pbmc_ctrl_stim.h5ad")
        key = "seurat_annotations_partial"
        adata = adata[adata.obs[key].notna()].copy()
    else:
        raise ValueError(f"unknown data set {name!r}")
    return highly_variable(adata, n_genes), key


def highly_variable(adata: ad.AnnData, n_genes: int) -> ad.AnnData:
    """Copy restricted to the ``n_genes`` most highly variable genes (scanpy ``seurat_v3`` on counts)."""
    sc.pp.filter_genes(adata, min_cells=3)
    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=n_genes)
    return adata[:, adata.var["highly_variable"]].copy()


def marker_sets(logged: ad.AnnData, key: str, n_markers: int) -> dict[str, set[str]]:
    sc.tl.rank_genes_groups(logged, key, method="wilcoxon")
    result = logged.uns["rank_genes_groups"]
    out = {}
    for group in result["names"].dtype.names:
        names, lfc = result["names"][group], result["logfoldchanges"][group]
        out[group] = set(list(names[lfc > 0])[:n_markers])
    return out


def marker_context(
    adata: ad.AnnData, key: str, n_markers: int
) -> tuple[dict[str, set[str]], list[set[str]], np.ndarray, np.ndarray]:
    """Marker sets, each gene's cell types, the marker genes' indices, and Pearson on log1p-normalised counts."""
    logged = adata.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    markers = marker_sets(logged, key, n_markers)
    gene_types = [{t for t, genes in markers.items() if g in genes} for g in adata.var_names]
    marker_idx = np.array([i for i, t in enumerate(gene_types) if t])
    x = logged.X.toarray() if sp.issparse(logged.X) else np.asarray(logged.X)
    return markers, gene_types, marker_idx, np.nan_to_num(np.corrcoef(x.T))


def degree_preserving_shuffles(pairs: set[tuple[int, int]], n_random: int) -> Iterator[set[tuple[int, int]]]:
    """``n_random`` random graphs with the degrees of ``pairs`` (networkx double-edge swaps, seeds 0, 1, ...)."""
    network = nx.Graph(list(pairs))
    n_edges = len(pairs)
    for seed in range(n_random):
        shuffled = network.copy()
        nx.double_edge_swap(shuffled, nswap=4 * n_edges, max_tries=100 * n_edges, seed=seed)
        yield {tuple(sorted(e)) for e in shuffled.edges}


def random_same_type(pairs: set[tuple[int, int]], gene_types: list[set[str]], n_random: int) -> float:
    """Mean number of same-type edges of ``n_random`` graphs with the degrees of ``pairs``."""
    return float(
        np.mean([same_type(graph, gene_types) for graph in degree_preserving_shuffles(pairs, n_random)])
    )


def embedding_auroc(
    adata: ad.AnnData,
    model: sct.GeneTransformer,
    kind: str,
    marker_idx: np.ndarray,
    gene_types: list[set[str]],
) -> float:
    """AUROC over marker pairs of the cosine similarity of the model's ``kind`` gene embeddings."""
    embedded = sct.tl.gene_embedding(adata, model, kind=kind, copy=True)
    vectors = embedded.varm[f"sct_gene_embedding{'' if kind == 'identity' else '_contextual'}"]
    vectors = vectors - vectors.mean(0)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return auroc(vectors @ vectors.T, marker_idx, gene_types)


def top_k_union(score: np.ndarray, top_k: int) -> sp.csr_matrix:
    """Each gene's top_k positive scores, symmetrised by union (max), as tl.gene_graph does."""
    score = score.copy()
    np.fill_diagonal(score, 0)
    top = np.argpartition(-score, top_k - 1, axis=1)[:, :top_k]
    rows = np.repeat(np.arange(score.shape[0]), top_k)
    vals = score[rows, top.ravel()]
    keep = vals > 0
    graph = sp.csr_matrix((vals[keep], (rows[keep], top.ravel()[keep])), shape=score.shape)
    return graph.maximum(graph.T).tocsr()


def edges(graph: sp.spmatrix) -> set[tuple[int, int]]:
    coo = sp.triu(graph, k=1).tocoo()
    return set(zip(coo.row.tolist(), coo.col.tolist(), strict=True))


def trim(graph: sp.csr_matrix, n_edges: int) -> set[tuple[int, int]]:
    """The ``n_edges`` strongest edges of a symmetric graph."""
    coo = sp.triu(graph, k=1).tocoo()
    order = np.argsort(-coo.data, kind="stable")[:n_edges]
    return set(zip(coo.row[order].tolist(), coo.col[order].tolist(), strict=True))


def same_count(score: np.ndarray, n_edges: int, top_k: int) -> set[tuple[int, int]]:
    """The ``n_edges`` strongest edges of the top-k union of ``score``, k raised from ``top_k`` until there are enough."""
    k = top_k
    while len(edges(top_k_union(score, k))) < n_edges and k < len(score) - 1:
        k += 1
    return trim(top_k_union(score, k), n_edges)


def detection_correlation(adata: ad.AnnData) -> np.ndarray:
    """Pearson correlation over cells of whether each gene is detected (count > 0): co-detection."""
    detected = (adata.X > 0).astype(np.float32)
    detected = detected.toarray() if sp.issparse(detected) else np.asarray(detected)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num(np.corrcoef(detected.T))


def same_type(pairs: set[tuple[int, int]], gene_types: list[set[str]]) -> int:
    return sum(bool(gene_types[i] & gene_types[j]) for i, j in pairs)


def auroc(score: np.ndarray, markers: np.ndarray, gene_types: list[set[str]]) -> float:
    i, j = np.triu_indices(len(markers), k=1)
    a, b = markers[i], markers[j]
    label = np.array([bool(gene_types[x] & gene_types[y]) for x, y in zip(a, b, strict=True)])
    return float(roc_auc_score(label, score[a, b]))


def run(name: str, args: argparse.Namespace) -> list[dict]:
    adata, key = load(name, args.genes)
    markers, gene_types, marker_idx, pearson = marker_context(adata, key, args.markers)
    detection = detection_correlation(adata)  # a baseline for co-attention: which genes are tokens together

    sct.setup_anndata(adata)  # no labels
    untrained = sct.GeneTransformer(adata, **args.model)  # the trained model's initial weights (same seed)
    model = sct.GeneTransformer(adata, **args.model)
    start_weights = zip(
        untrained.module.state_dict().values(), model.module.state_dict().values(), strict=True
    )
    assert all(torch.equal(a, b) for a, b in start_weights), "the two models must start from the same weights"
    start = time.perf_counter()
    model.train(enable_progress_bar=False, logger=False, **args.train)
    train_minutes = (time.perf_counter() - start) / 60

    rows = []
    for options in args.graphs:
        start = time.perf_counter()
        full = sct.tl.gene_graph(adata, model, **{"top_k": adata.n_vars - 1, **options}, copy=True)
        graph_minutes = (time.perf_counter() - start) / 60
        attention_score = full.varp["sct_gene_graph"].toarray()
        attention_edges = edges(top_k_union(attention_score, args.top_k))
        n_edges = len(attention_edges)

        expected = random_same_type(attention_edges, gene_types, args.random_graphs)
        # the same graph before training: what the architecture and input encoding give unlearned
        control = sct.tl.gene_graph(adata, untrained, **{"top_k": adata.n_vars - 1, **options}, copy=True)
        control_score = control.varp["sct_gene_graph"].toarray()

        label = f"graph {json.dumps(options)}" if options else "graph (sctransformer defaults)"
        for method, pairs, score in (
            (label, attention_edges, attention_score),
            (
                "the same graph, untrained model (initial weights), same edge count",
                same_count(control_score, n_edges, args.top_k),
                control_score,
            ),
            ("Pearson co-expression, same edge count", same_count(pearson, n_edges, args.top_k), pearson),
            (
                "co-detection correlation, same edge count",
                same_count(detection, n_edges, args.top_k),
                detection,
            ),
        ):
            hits = same_type(pairs, gene_types)
            rows.append(
                {
                    "data": name,
                    "method": method,
                    "edges": len(pairs),
                    "same_type": hits,
                    "enrichment": hits / expected if expected else float("nan"),
                    "auroc": auroc(score, marker_idx, gene_types),
                    "minutes": graph_minutes,
                }
            )
        rows.append(
            {
                "data": name,
                "method": f"random, same degrees (mean of {args.random_graphs})",
                "edges": n_edges,
                "same_type": expected,
                "enrichment": 1.0,
                "auroc": 0.5,
            }
        )
    for kind in ("identity", "contextual"):  # gene embeddings: cosine similarity, AUROC only
        rows.append(
            {
                "data": name,
                "method": f"cosine of {kind} gene embeddings (AUROC only)",
                "edges": float("nan"),
                "same_type": float("nan"),
                "enrichment": float("nan"),
                "auroc": embedding_auroc(adata, model, kind, marker_idx, gene_types),
            }
        )
    print(
        f"# {name}: {adata.n_obs} cells x {adata.n_vars} genes, {len(markers)} types, "
        f"{len(marker_idx)} marker genes; training {train_minutes:.1f} min, last graph {graph_minutes:.2f} min",
        flush=True,
    )
    return rows


def memory(n_genes: int, n_cells: int, score: str = "co-attention") -> None:
    """Peak RSS of one gene graph over ``n_genes`` synthetic genes (run alone: ``--memory``)."""
    import resource

    adata = sct.datasets.synthetic(n_cells, n_genes, n_cell_types=4, n_markers=50, mean_counts=3000)
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, d_model=16, n_layers=1, n_heads=2, max_length=256)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    start = time.perf_counter()
    sct.tl.gene_graph(adata, model, score=score, top_k=10, batch_size=64)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    summed = f" (dense float32 sum {4 * n_genes**2 / 2**30:.2f} GiB)" if score == "attention" else ""
    print(
        f"{score} gene graph over {n_genes:,} genes, {n_cells} cells (256 tokens each): "
        f"peak RSS +{peak - before:.2f} GiB{summed}, {time.perf_counter() - start:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", nargs="+", default=["pbmc68k", "paul15", "cellbench", "kang18"])
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--genes", type=int, default=1000)
    parser.add_argument("--markers", type=int, default=25)
    parser.add_argument("--random-graphs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--model", type=json.loads, default={})
    parser.add_argument(
        "--graphs", type=json.loads, default=[{"score": "attention"}, {"score": "co-attention"}]
    )
    parser.add_argument("--train", type=json.loads, default={})
    parser.add_argument("--memory", type=int, default=None, help="only measure memory for this many genes")
    parser.add_argument("--memory-score", default="co-attention", help="score of the --memory graph")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory:
        memory(args.memory, n_cells=600, score=args.memory_score)
        return
    rows = []
    for name in args.datasets:
        rows += run(name, args)
    print(
        f"\ntop_k={args.top_k}, {args.markers} markers per type, {args.threads} threads, "
        f"model {args.model}, train {args.train}"
    )
    print("| data | graph | edges | same-type marker edges | enrichment vs random | AUROC (marker pairs) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if np.isnan(r["edges"]):
            print(f"| {r['data']} | {r['method']} | — | — | — | {r['auroc']:.3f} |")
            continue
        print(
            f"| {r['data']} | {r['method']} | {r['edges']} | {r['same_type']:.1f} | "
            f"{r['enrichment']:.2f} | {r['auroc']:.3f} |"
        )


if __name__ == "__main__":
    main()
