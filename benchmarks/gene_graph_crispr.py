"""Does the attention gene graph recover CRISPR-established gene relations better than co-expression?

``benchmarks/gene_graph.py`` validates :func:`sctransformer.tl.gene_graph` against cell-type marker
sets, which co-expression also defines. This script uses an interventional ground truth instead:
papalexi21 ECCITE-seq (THP-1 cells, low-MOI CRISPR knock-outs of 25 genes of the IFN-gamma / PD-L1
pathway plus ``non-targeting`` guides), restricted to 299 genes. Ground truths, from log1p-normalised
counts (``normalize_total`` to 1e4), scanpy ``rank_genes_groups`` (Wilcoxon, each knock-out against
the ``non-targeting`` cells; Benjamini-Hochberg within each knock-out over the 299 genes; significant:
adjusted p < 0.05). Wilcoxon is robust to the zero-inflated counts and is what the other benchmarks
use; cells whose knock-out did not take (no mixscape filtering here) only weaken effects, not bias them.

1. **target -> responder**: for each knock-out target among the 299 genes, its responders are the
   genes, other than the target, significant in its knock-out cells. Pairs (target, gene) of the
   targets with at least one responder; label: responder. Scored by AUROC of each graph's pair score,
   by how many edges of the equal-count graph join a target to one of its responders (out of the
   target's edges: this depends on the targets' degrees), and by the responders among each target's
   own ``--top-k`` highest-scoring genes (degree-free; chance: k * responders / 298 per target).
2. **co-response**: each gene's effect vector is its Wilcoxon z-scores over the 25 knock-outs. Genes
   with a significant effect in at least two knock-outs are "responsive"; two responsive genes are
   co-regulated when their effect vectors correlate (Pearson over knock-outs) with r > 0.5, and, a
   stricter set, when r is in the top 5% of responsive pairs. AUROC over all pairs of responsive
   genes; edges joining co-regulated pairs.

Graphs over the 299 genes (each gene's ``--top-k`` strongest positive scores, symmetrised by union,
and every graph trimmed to the edge count of (a), raising k where it has fewer): (a)
``tl.gene_graph`` default (co-attention, first layer); (b) ``score="attention"`` (gene -> gene,
co-expression-corrected, last layer); (c) Pearson on log1p-normalised counts; (d) Pearson of
detection (count > 0); (e) random graphs with the degrees of (a) (networkx double-edge swaps; AUROC
0.5 by construction); (f) (a) and (b) from the untrained model (the trained model's initial weights,
same seed); (g) a score that knows no pairing, only how often each gene is detected (the smaller of
the two genes' detection rates): how much of a ground truth is "well-detected genes respond". AUROCs use each graph's full score matrix (``top_k = n_genes - 1``; co-attention stores
only positive correlations, negative pairs tie at 0).

The model is trained self-supervised (``setup_anndata`` without phenotype keys, default
settings, ``--epochs`` epochs) on all cells. Two readings of the same model: (i) graphs and the
correlations on all cells; (ii) on the non-targeting cells only, where co-expression has not seen a
knock-out but the model has (in training). In (i) Pearson sees the knock-out-driven co-variation, so
the ground truth is partly in its input.

Usage: python benchmarks/gene_graph_crispr.py [--threads 1] [--epochs 3] [--top-k 10] [--seed 0]
       [--random-graphs 20]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp
import torch
from sklearn.metrics import roc_auc_score

import sctransformer as sct

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gene_graph import (
    degree_preserving_shuffles,
    edges,
    same_count,
    top_k_union,
)  # the marker benchmark's graphs, counted alike

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FILE = "papalexi21_eccite_crispr_lowmoi_299genes.h5ad"
KEY, CONTROL = "perturbation_target", "non-targeting"


def logged(adata: ad.AnnData) -> ad.AnnData:
    out = adata.copy()
    sc.pp.normalize_total(out, target_sum=1e4)
    sc.pp.log1p(out)
    return out


def knockout_effects(adata: ad.AnnData) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Knock-outs, and per gene x knock-out the Wilcoxon z-score and significance (BH < 0.05) vs control."""
    log = logged(adata)
    sc.tl.rank_genes_groups(log, KEY, reference=CONTROL, method="wilcoxon")
    result = log.uns["rank_genes_groups"]
    targets = list(result["names"].dtype.names)
    column = {g: i for i, g in enumerate(adata.var_names)}
    z = np.zeros((adata.n_vars, len(targets)))
    significant = np.zeros_like(z, dtype=bool)
    for j, target in enumerate(targets):
        rows = [column[g] for g in result["names"][target]]
        z[rows, j] = result["scores"][target]
        significant[rows, j] = result["pvals_adj"][target] < 0.05
    return targets, z, significant


def ground_truths(adata: ad.AnnData) -> dict:
    targets, z, significant = knockout_effects(adata)
    column = {g: i for i, g in enumerate(adata.var_names)}
    responders = {}
    for j, target in enumerate(targets):
        if target in column:
            hits = set(np.flatnonzero(significant[:, j]).tolist()) - {column[target]}
            responders[column[target]] = hits
    responsive = np.flatnonzero(significant.sum(1) >= 2)
    r = np.corrcoef(z[responsive])
    i, j = np.triu_indices(len(responsive), k=1)
    pair_r = r[i, j]
    threshold = np.quantile(pair_r, 0.95)
    return {
        "responders": responders,
        "responsive": responsive,
        "pairs": (responsive[i], responsive[j]),
        "coreg": pair_r > 0.5,
        "coreg_top": pair_r >= threshold,
        "top_threshold": threshold,
        "names": list(adata.var_names),
    }


def correlations(adata: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
    """Pearson over cells of log1p-normalised counts, and of detection (count > 0)."""
    x = logged(adata).X
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    detected = (adata.X > 0).astype(np.float32)
    detected = detected.toarray() if sp.issparse(detected) else np.asarray(detected)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num(np.corrcoef(x.T)), np.nan_to_num(np.corrcoef(detected.T))


def graph_score(adata: ad.AnnData, model: sct.GeneTransformer, **options) -> np.ndarray:
    full = sct.tl.gene_graph(adata, model, top_k=adata.n_vars - 1, copy=True, **options)
    return full.varp["sct_gene_graph"].toarray()


def counts(pairs: set[tuple[int, int]], truth: dict) -> dict[str, float]:
    """Edges joining a target to a responder, and co-regulated pairs among the edges."""
    responders = truth["responders"]
    a, b = truth["pairs"]
    coreg = {(x, y) for x, y, c in zip(a, b, truth["coreg"], strict=True) if c}
    top = {(x, y) for x, y, c in zip(a, b, truth["coreg_top"], strict=True) if c}
    target_edges = hits = 0
    for x, y in pairs:
        for t, g in ((x, y), (y, x)):
            if responders.get(t):  # an edge between two targets counts for each
                target_edges += 1
                hits += g in responders[t]
    return {
        "target_edges": target_edges,
        "responder_edges": hits,
        "coreg_edges": len(pairs & coreg),
        "top_edges": len(pairs & top),
    }


def target_top_k(score: np.ndarray, truth: dict, top_k: int) -> int:
    """Responders among each target's own ``top_k`` highest-scoring genes, summed over the targets."""
    hits = 0
    for t, responders in truth["responders"].items():
        if responders:
            row = np.maximum(score[t], score[:, t])
            row[t] = -np.inf
            hits += len(set(np.argsort(-row, kind="stable")[:top_k].tolist()) & responders)
    return hits


def aurocs(score: np.ndarray, truth: dict) -> dict[str, float]:
    t_scores, t_labels = [], []
    for t, hits in truth["responders"].items():
        if not hits:
            continue
        others = [g for g in range(len(score)) if g != t]
        t_scores += [max(score[t, g], score[g, t]) for g in others]
        t_labels += [g in hits for g in others]
    a, b = truth["pairs"]
    pair = np.maximum(score[a, b], score[b, a])
    return {
        "responder_auroc": float(roc_auc_score(t_labels, t_scores)),
        "coreg_auroc": float(roc_auc_score(truth["coreg"], pair)),
        "top_auroc": float(roc_auc_score(truth["coreg_top"], pair)),
    }


def random_counts(pairs: set[tuple[int, int]], truth: dict, n_random: int) -> dict[str, float]:
    """Mean counts of ``n_random`` graphs with the degrees of ``pairs`` (double-edge swaps)."""
    rows = [counts(graph, truth) for graph in degree_preserving_shuffles(pairs, n_random)]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def reading(
    name: str,
    adata: ad.AnnData,
    model: sct.GeneTransformer,
    untrained: sct.GeneTransformer,
    truth: dict,
    args: argparse.Namespace,
) -> list[dict]:
    start = time.perf_counter()
    pearson, detection = correlations(adata)
    rate = np.asarray((adata.X > 0).mean(0)).ravel()  # share of cells detecting each gene
    scores = {
        "(a) co-attention (tl.gene_graph default)": graph_score(adata, model),
        "(b) gene -> gene attention": graph_score(adata, model, score="attention"),
        "(c) Pearson, log1p-normalised": pearson,
        "(d) co-detection correlation": detection,
        "(f) co-attention, untrained model": graph_score(adata, untrained),
        "(f) gene -> gene attention, untrained model": graph_score(adata, untrained, score="attention"),
        "(g) detection rate only: min of the two genes' (no pairing)": np.minimum.outer(rate, rate),
    }
    reference = edges(top_k_union(scores["(a) co-attention (tl.gene_graph default)"], args.top_k))
    n_edges = len(reference)
    rows = []
    for method, score in scores.items():
        pairs = same_count(score, n_edges, args.top_k)
        rows.append({"reading": name, "method": method, "edges": len(pairs), **counts(pairs, truth)})
        rows[-1].update(aurocs(score, truth), top_k_hits=target_top_k(score, truth, args.top_k))
    random = random_counts(reference, truth, args.random_graphs)
    n_genes = len(truth["names"])  # a random top-k holds k * responders / (n - 1) responders
    chance = sum(args.top_k * len(r) / (n_genes - 1) for r in truth["responders"].values())
    rows.insert(
        4,
        {
            "reading": name,
            "method": f"(e) random, degrees of (a) (mean of {args.random_graphs})",
            "edges": n_edges,
            **random,
            "responder_auroc": 0.5,
            "coreg_auroc": 0.5,
            "top_auroc": 0.5,
            "top_k_hits": chance,
        },
    )
    print(f"# {name}: {adata.n_obs} cells, graphs {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-graphs", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    adata = ad.read_h5ad(DATA / FILE)
    truth = ground_truths(adata)
    names = truth["names"]
    print("# responders (BH < 0.05, Wilcoxon vs non-targeting, target itself excluded):")
    for t, hits in truth["responders"].items():
        print(f"#   {names[t]}: {len(hits)}")
    print(
        f"# co-response: {len(truth['responsive'])} genes significant in >= 2 knock-outs, "
        f"{len(truth['coreg'])} pairs; r > 0.5: {int(truth['coreg'].sum())}; "
        f"top 5% (r >= {truth['top_threshold']:.3f}): {int(truth['coreg_top'].sum())}",
        flush=True,
    )

    sct.setup_anndata(adata)  # no labels
    untrained = sct.GeneTransformer(adata, seed=args.seed)
    model = sct.GeneTransformer(adata, seed=args.seed)
    start_weights = zip(
        untrained.module.state_dict().values(), model.module.state_dict().values(), strict=True
    )
    assert all(torch.equal(a, b) for a, b in start_weights), "the two models must start from the same weights"
    start = time.perf_counter()
    model.train(args.epochs, seed=args.seed, enable_progress_bar=False, logger=False)
    print(f"# training: {args.epochs} epochs, {(time.perf_counter() - start) / 60:.1f} min", flush=True)

    control = adata[(adata.obs[KEY] == CONTROL).to_numpy()].copy()
    rows = reading("(i) all cells", adata, model, untrained, truth, args)
    rows += reading("(ii) non-targeting cells", control, model, untrained, truth, args)

    n_top = args.top_k * sum(bool(r) for r in truth["responders"].values())
    print(f"\ntop_k={args.top_k}, {args.epochs} epochs, seed {args.seed}, {args.threads} threads")
    print(
        "| reading | graph | edges | target-responder edges / target edges | responder AUROC "
        f"| responders in targets' top-{args.top_k} (of {n_top}) | co-reg (r>0.5) edges | co-reg AUROC "
        "| top-5% co-reg edges | top-5% AUROC |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['reading']} | {r['method']} | {r['edges']} | "
            f"{r['responder_edges']:.1f} / {r['target_edges']:.0f} | {r['responder_auroc']:.3f} | "
            f"{r['top_k_hits']:.1f} | {r['coreg_edges']:.1f} | {r['coreg_auroc']:.3f} | "
            f"{r['top_edges']:.1f} | {r['top_auroc']:.3f} |"
        )


if __name__ == "__main__":
    main()
