"""Within one condition, does the attention graph link the genes of a programme that co-expression cannot see?

The marker benchmark (``benchmarks/gene_graph.py``) asks whether attention links genes of the
same cell type, which is what co-expression measures best. This script asks the question where
co-expression is weakest: within the interferon-stimulated kang18 cells, the interferon programme
is switched on in every cell, so its genes hardly co-vary there, and Pearson correlation within
the group has little to go on; a model trained on control and stimulated cells together has seen
the programme switch on and off and might still relate its genes when read on stimulated cells
only (``sct.tl.gene_graph(adata, model, groupby="condition")``).

The programme: the top ``--programme`` genes of stimulated against control cells
(``rank_genes_groups``, Wilcoxon, all cells), a set defined by the response to interferon-beta,
not by co-variation within either group. Per condition and graph, printed: AUROC of the score of
programme gene -> other programme gene against programme gene -> any other gene; the same against
only "matched" genes, for each programme gene the ``--matched`` other genes nearest to it in
(share of the group's cells expressing the gene, mean log-expression) rank; and the number of
programme-programme edges among each gene's ``--top-k`` strongest edges (symmetrised).

Besides Pearson correlation, a second co-expression score: co-occurrence, the share of the group's
cells in which both genes are detected. Attention is read two ways: gene -> gene attention
(``normalize="coexpression"`` and ``"none"``) and co-attention (``score="co-attention"``, the
correlation over the group's cells of the ``[CLS]`` token's attention to each gene).

The matched column is the one to read: a score that merely favours genes expressed in most cells
(raw attention, ``normalize="none"``, or co-occurrence) links the programme's genes, which
stimulated cells all express, without relating them to each other.

Usage: python benchmarks/gene_graph_program.py [--epochs 5] [--genes 1000] [--threads 2]
       [--model '<GeneTransformer kwargs JSON>'] [--seed 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import torch
from sklearn.metrics import roc_auc_score

import sctransformer as sct

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
_spec = importlib.util.spec_from_file_location(
    "gene_graph_benchmark", Path(__file__).resolve().parent / "gene_graph.py"
)
gg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gg)


def matched_genes(logged: np.ndarray, programme: np.ndarray, n_matched: int) -> np.ndarray:
    """For each programme gene, the ``n_matched`` other genes nearest in (expressing share, mean) rank."""
    features = np.c_[pd.Series((logged > 0).mean(0)).rank(pct=True), pd.Series(logged.mean(0)).rank(pct=True)]
    others = np.setdiff1d(np.arange(logged.shape[1]), programme)
    chosen: set[int] = set()
    for gene in programme:
        distance = np.linalg.norm(features[others] - features[gene], axis=1)
        chosen.update(others[np.argsort(distance)[:n_matched]].tolist())
    return np.array(sorted(chosen))


def programme_auroc(score: np.ndarray, programme: np.ndarray, targets: np.ndarray) -> float:
    """AUROC of ``score[i, j]`` over programme rows ``i``: target ``j`` in the programme or not."""
    is_programme = np.isin(targets, programme)
    values, labels = [], []
    for i in programme:
        keep = targets != i
        values.append(score[i, targets[keep]])
        labels.append(is_programme[keep])
    return float(roc_auc_score(np.concatenate(labels), np.concatenate(values)))


def programme_edges(score: np.ndarray, programme: np.ndarray, top_k: int) -> int:
    """Programme-programme pairs among each gene's ``top_k`` strongest edges (symmetrised)."""
    score = score.copy()
    np.fill_diagonal(score, -np.inf)
    top = np.argsort(-score, axis=1)[:, :top_k]
    pairs = {tuple(sorted((i, int(j)))) for i in range(len(score)) for j in top[i]}
    inside = set(programme.tolist())
    return sum(i in inside and j in inside for i, j in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--genes", type=int, default=1000)
    parser.add_argument("--programme", type=int, default=40)
    parser.add_argument("--matched", type=int, default=5)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--model", type=json.loads, default={})
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    adata = gg.highly_variable(ad.read_h5ad(DATA / "kang18_ifnb_pbmc_ctrl_stim.h5ad"), args.genes)
    logged = adata.copy()
    logged.X = sct.metrics.log1p_normalise(adata.X)
    sc.tl.rank_genes_groups(logged, "condition", groups=["stim"], reference="ctrl", method="wilcoxon")
    names = pd.DataFrame(logged.uns["rank_genes_groups"]["names"])["stim"].head(args.programme)
    programme = np.array([adata.var_names.get_loc(g) for g in names])
    print(f"# kang18: {adata.n_obs} cells x {adata.n_vars} HVGs; programme: {', '.join(names[:12])}, ...")

    sct.setup_anndata(adata)
    model = sct.GeneTransformer(adata, **args.model)
    start = time.perf_counter()
    model.train(max_epochs=args.epochs, seed=args.seed, enable_progress_bar=False)
    print(f"# trained {args.epochs} epochs in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    readings = {
        'attention, normalize="coexpression"': {"normalize": "coexpression"},
        'attention, normalize="none"': {"normalize": "none"},
        "co-attention ([CLS] attention correlated over cells)": {"score": "co-attention"},
    }
    graphs = {
        name: sct.tl.gene_graph(
            adata, model, groupby="condition", top_k=adata.n_vars - 1, copy=True, **options
        )
        for name, options in readings.items()
    }

    rows = []
    everything = np.arange(adata.n_vars)
    for group in ("stim", "ctrl"):
        cells = (adata.obs["condition"] == group).to_numpy()
        x = logged.X[cells].toarray()
        matched = matched_genes(x, programme, args.matched)
        with np.errstate(invalid="ignore"):
            scores = {"Pearson co-expression": np.nan_to_num(np.corrcoef(x.T))}
        detected = (x > 0).astype(np.float32)
        scores["co-occurrence"] = detected.T @ detected / len(detected)
        for name, graph in graphs.items():
            scores[name] = graph.varp[f"sct_gene_graph_{group}"].toarray()
        for name, score in scores.items():
            rows.append(
                {
                    "condition": f"{group} ({cells.sum():,} cells)",
                    "graph": name,
                    "AUROC vs all genes": programme_auroc(score, programme, everything),
                    "AUROC vs matched genes": programme_auroc(score, programme, np.r_[programme, matched]),
                    f"programme edges in top-{args.top_k}": programme_edges(score, programme, args.top_k),
                }
            )
    print(f"\nmodel {args.model}, seed {args.seed}, {args.threads} threads")
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
