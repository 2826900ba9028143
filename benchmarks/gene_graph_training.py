"""Does the attention graph get better with more training? Graph quality against training budget.

The gene-graph benchmark (``benchmarks/gene_graph.py``) trains each model for about a minute on
the labelled cells only, and its attention graph is barely above chance. This script asks whether
that is a matter of training: it trains self-supervised models (no labels) on the whole of kang18
(13,999 cells, control and stimulated) for several budgets, each a full run with its own warm-up
and cosine schedule, and scores each model's graph exactly as ``benchmarks/gene_graph.py`` does,
on the 832 cells with cell-type labels (markers from ``rank_genes_groups`` on those cells), against
the Pearson co-expression graph of the same cells with the same number of edges.

Printed per budget: epochs, cells seen, minutes of training, masked-expression accuracy and (with
``gene_prediction``) masked-gene accuracy on the validation cells, and AUROC over marker pairs
(same type or not) of the attention score, of the identity and contextual gene embeddings
(cosine), and enrichment of same-type edges over degree-preserving random graphs.

Usage: python benchmarks/gene_graph_training.py [--epochs 1 5 20] [--genes 1000] [--threads 2]
       [--model '<GeneTransformer kwargs JSON>'] [--normalize coexpression none] [--readings]

``--readings`` also scores the pre-softmax scores, value-norm-weighted attention and (models with
``gene_prediction``) gradient-weighted attention of the hidden-identity rows.
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
import torch

import sctransformer as sct

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data"

_spec = importlib.util.spec_from_file_location("gene_graph_benchmark", HERE / "gene_graph.py")
gg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gg)
_spec = importlib.util.spec_from_file_location("gene_graph_rows_trial", HERE / "gene_graph_rows.py")
rows_trial = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rows_trial)


def _hidden_identity_rows(
    model: sct.GeneTransformer, adata: ad.AnnData, p: float, passes: int, *, gradient: bool
) -> np.ndarray:
    """Co-expression-corrected score of the last layer's attention rows of tokens whose gene identity is hidden.

    Row gene: the hidden token's true gene (which the model does not see); keys: the cell's tokens
    whose identity is shown. Each pass hides a random share ``p`` of every cell's gene tokens. With
    ``gradient``, each probability is multiplied by the gradient of the log-probability the model
    gives the hidden token's true gene, negative products set to 0 (Chefer et al., 2021): how much
    attending to each shown gene helped name the hidden one. In the last layer a row's attention
    reaches only its own token's output, so differentiating the sum of the hidden tokens'
    log-probabilities once gives every row its own gradient. Heads are averaged.
    """
    module = model.module
    v2g, c2g = rows_trial.graph_lookup(model, adata)
    acc = rows_trial.DirectedAccumulator(adata.n_vars)
    generator = torch.Generator().manual_seed(0)
    start, last = module.n_prefix, module.blocks[-1]
    module.eval()
    for _ in range(passes):
        for idx, x in rows_trial.minibatches(model, adata):
            tokens = module.tokenize(x, c2g)
            context = tokens.is_context
            hidden = (torch.rand(context.shape, generator=generator) < p) & context
            phenotypes = torch.full((len(idx), module.n_phenotypes), -1, dtype=torch.long)
            with torch.no_grad():
                h, key_mask = module.embed_tokens(tokens, phenotypes, gene_mask=hidden)
                for block in module.blocks[:-1]:
                    h = block(h, key_mask)
                x_last = last.norm_attention(h)
                probs = last.attention.attention_probabilities(x_last, key_mask)
            if gradient:  # the rest of the last block, differentiated with respect to probs
                v = last.attention._heads(x_last)[2]
                probs.requires_grad_()
                n, length, d = h.shape
                out = h + last.attention.out((probs @ v).transpose(1, 2).reshape(n, length, d))
                out = module.norm(out + last.mlp(last.norm_mlp(out)))
                logits = module.gene_logits(out, tokens, hidden)
                logits.log_softmax(-1).gather(1, tokens.gene_ids[hidden][:, None]).sum().backward()
                probs = (probs.grad * probs).clamp(min=0)
            attention = probs.detach().mean(1)[:, start:, start:].float()
            genes = v2g[tokens.gene_ids]
            acc.add(
                genes.masked_fill(~hidden, -1),
                genes.masked_fill(~(context & ~hidden), -1),
                attention,
                context.sum(1).float(),
            )
    return acc.score()


def attention_readings(model: sct.GeneTransformer, adata: ad.AnnData) -> dict[str, np.ndarray]:
    """Other readings of the same attention, each a symmetric genes x genes score.

    ``logits_last`` / ``logits_all``: the pre-softmax scores ``q.k / sqrt(d_head)`` (heads averaged;
    last layer / layers averaged), averaged over the cells where both genes are tokens (pairs
    together in fewer than 10 cells rank last); ``value_norm``: the last layer's attention
    probabilities times the norm of each key's transformed value ``||W_o,h v_j,h||``, summed over
    heads (Kobayashi et al., 2020), scored like ``tl.gene_graph``.
    """
    module = model.module
    v2g, c2g = rows_trial.graph_lookup(model, adata)
    accumulators = {
        name: rows_trial.DirectedAccumulator(adata.n_vars)
        for name in ("logits_last", "logits_all", "value_norm")
    }
    start = module.n_prefix
    with model._inference():
        for idx, x in rows_trial.minibatches(model, adata):
            tokens = module.tokenize(x, c2g)
            context = tokens.is_context
            phenotypes = torch.full((len(idx), module.n_phenotypes), -1, dtype=torch.long)
            h, key_mask = module.embed_tokens(tokens, phenotypes)
            genes = v2g[tokens.gene_ids].masked_fill(~context, -1)
            layer_logits = []
            for block in module.blocks:
                attention = block.attention
                q, k, v = attention._heads(block.norm_attention(h))
                logits = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
                layer_logits.append(logits.mean(1)[:, start:, start:].float())
                if block is module.blocks[-1]:
                    probs = logits.masked_fill(~key_mask[:, None, None, :], float("-inf")).softmax(-1)
                    d = h.shape[-1]
                    w_out = attention.out.weight.view(d, attention.n_heads, d // attention.n_heads)
                    norms = torch.einsum("dhe,nhje->nhjd", w_out, v).norm(dim=-1)
                    weighted = (probs * norms[:, :, None, :]).sum(1)[:, start:, start:].float()
                    accumulators["value_norm"].add(genes, genes, weighted, context.sum(1).float())
                h = block(h, key_mask)
            ones = torch.ones(len(idx))
            accumulators["logits_last"].add(genes, genes, layer_logits[-1], ones)
            accumulators["logits_all"].add(genes, genes, torch.stack(layer_logits).mean(0), ones)
    scores = {"value_norm": accumulators["value_norm"].score(min_cells=10)}
    for name in ("logits_last", "logits_all"):
        acc = accumulators[name]
        total, count = (
            acc.total[: adata.n_vars, : adata.n_vars].numpy(),
            acc.count[: adata.n_vars, : adata.n_vars].numpy(),
        )
        total, count = total + total.T, count + count.T
        mean = np.divide(total, count, out=np.full_like(total, np.nan), where=count > 0)
        mean[count / 2 < 10] = np.nan
        mean = np.nan_to_num(mean, nan=np.nanmin(mean) - 1)  # logits can be negative: rare pairs rank last
        np.fill_diagonal(mean, 0)
        scores[name] = mean
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--genes", type=int, default=1000)
    parser.add_argument("--markers", type=int, default=25)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--random-graphs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--model", type=json.loads, default={})
    parser.add_argument("--normalize", nargs="+", default=["coexpression"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--readings",
        action="store_true",
        help="also score pre-softmax, value-norm-weighted and gradient-weighted attention",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    full = gg.highly_variable(ad.read_h5ad(DATA / "kang18_ifnb_pbmc_ctrl_stim.h5ad"), args.genes)
    key = "seurat_annotations_partial"
    labelled = full[full.obs[key].notna()].copy()
    markers, gene_types, marker_idx, pearson = gg.marker_context(labelled, key, args.markers)
    print(
        f"# kang18: train on {full.n_obs} cells x {full.n_vars} HVGs; graph on {labelled.n_obs} labelled cells, "
        f"{len(markers)} types, {len(marker_idx)} marker genes; Pearson AUROC "
        f"{gg.auroc(pearson, marker_idx, gene_types):.3f}",
        flush=True,
    )

    sct.setup_anndata(full)
    sct.setup_anndata(labelled)
    rows = []
    for epochs in args.epochs:
        model = sct.GeneTransformer(full, **args.model)
        start = time.perf_counter()
        model.train(max_epochs=epochs, seed=args.seed, enable_progress_bar=False)
        minutes = (time.perf_counter() - start) / 60
        history = model.history
        row = {
            "epochs": epochs,
            "cells": epochs * full.n_obs,
            "minutes": minutes,
            "masked": float(history["expression_accuracy_validation"].iloc[-1, 0]),
            "gene": float(history["gene_accuracy_validation"].iloc[-1, 0])
            if "gene_accuracy_validation" in history
            else float("nan"),
        }
        for normalize in args.normalize:
            graph = sct.tl.gene_graph(
                labelled, model, top_k=labelled.n_vars - 1, normalize=normalize, copy=True
            )
            score = graph.varp["sct_gene_graph"].toarray()
            attention_edges = gg.edges(gg.top_k_union(score, args.top_k))
            expected = gg.random_same_type(attention_edges, gene_types, args.random_graphs)
            hits = gg.same_type(attention_edges, gene_types)
            row[f"auroc_{normalize}"] = gg.auroc(score, marker_idx, gene_types)
            row[f"enrichment_{normalize}"] = hits / max(expected, 1e-12)
        if model.module.gene_prediction:
            score = _hidden_identity_rows(model, labelled, p=0.15, passes=4, gradient=False)
            row["auroc_identity_rows"] = gg.auroc(score, marker_idx, gene_types)
        if args.readings:
            for name, score in attention_readings(model, labelled).items():
                row[f"auroc_{name}"] = gg.auroc(score, marker_idx, gene_types)
            if model.module.gene_prediction:
                score = _hidden_identity_rows(model, labelled, p=0.15, passes=4, gradient=True)
                row["auroc_gradient_rows"] = gg.auroc(score, marker_idx, gene_types)
        for kind in ("identity", "contextual"):
            row[f"auroc_{kind}"] = gg.embedding_auroc(labelled, model, kind, marker_idx, gene_types)
        rows.append(row)
        print(json.dumps(row), flush=True)

    columns = ["epochs", "cells", "minutes", "masked", "gene"]
    columns += [f"{m}_{n}" for n in args.normalize for m in ("auroc", "enrichment")]
    columns += ["auroc_identity", "auroc_contextual"]
    columns += ["auroc_identity_rows"] if "auroc_identity_rows" in rows[0] else []
    columns += [
        f"auroc_{name}"
        for name in ("logits_last", "logits_all", "value_norm", "gradient_rows")
        if f"auroc_{name}" in rows[0]
    ]
    print(f"\nmodel {args.model}, {args.threads} threads, seed {args.seed}")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else f"{row[c]:,}" for c in columns]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
