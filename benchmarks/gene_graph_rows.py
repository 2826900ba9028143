"""Trial: gene graphs from the attention rows of tokens whose value is hidden (masked or query tokens).

The hypothesis tested: ``tl.gene_graph`` reads every gene token's attention at inference, where no
value is hidden, so a token has no reason to look at other genes; rows of tokens whose value must
be predicted (masked values, or query tokens of held-out genes in a model trained with
``expression_queries``) should carry gene-gene structure. Variants, each scored like
``tl.gene_graph`` (co-expression-corrected mean of ``L_c * a_c(g -> h)``, symmetrised, top-k per
gene): all rows (= ``tl.gene_graph``), masked rows (``p`` of the context hidden, several seeded
passes), query rows (4 gene folds held out in turn; rows: the fold's expressed genes, or all).
Reuses ``benchmarks/gene_graph.py`` (data, markers, Pearson and random graphs, enrichment, AUROC),
so the numbers compare with its table. Writes ``results.md`` and ``results.json`` to ``--out``.

Usage: python benchmarks/gene_graph_rows.py [--datasets pbmc68k paul15] [--passes 4] [--out gene_graph_rows]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import sctransformer as sct
from sctransformer.data import iter_minibatches
from sctransformer.tl._gene_graph import _graph_genes

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

OUT = Path("gene_graph_rows")
MODELS = OUT / "models"
spec = importlib.util.spec_from_file_location("gg", Path(__file__).resolve().parent / "gene_graph.py")
gg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gg)


# --------------------------------------------------------------------------- accumulation
class DirectedAccumulator:
    """Sum over cells of L_c * a_c(g -> h) over counted rows g and keys h, and the number of cells counted.

    Score (symmetrised like tl.gene_graph): s_gh = (T_gh + T_hg) / (C_gh + C_hg), zero where
    (C_gh + C_hg) / 2 < min_cells. With every token a row and a key, C = C^T = "together" and this is
    exactly AttentionAccumulator's coexpression score.
    """

    def __init__(self, n_genes: int) -> None:
        self.n = n_genes
        self.total = torch.zeros(n_genes + 1, n_genes + 1, dtype=torch.float64)  # last row/col: dummy
        self.count = torch.zeros(n_genes + 1, n_genes + 1, dtype=torch.float64)

    def add(self, row_genes, col_genes, attention, scale):
        """row_genes (n,R), col_genes (n,K): graph index, <0 = not counted; attention (n,R,K)."""
        n, R, K = attention.shape
        G = self.n
        rg = torch.where(row_genes >= 0, row_genes, G).long()
        cg = torch.where(col_genes >= 0, col_genes, G).long()
        a = attention.double() * scale.double()[:, None, None]
        a = a * (row_genes >= 0)[:, :, None] * (col_genes >= 0)[:, None, :]
        b = torch.zeros(n, R, G + 1, dtype=torch.float64)
        b.scatter_add_(2, cg[:, None, :].expand(n, R, K), a)
        self.total.index_add_(0, rg.reshape(-1), b.reshape(n * R, G + 1))
        rows = torch.zeros(n, G + 1, dtype=torch.float64)
        rows.scatter_(1, rg, 1.0)
        cols = torch.zeros(n, G + 1, dtype=torch.float64)
        cols.scatter_(1, cg, 1.0)
        self.count += rows.T @ cols

    def score(self, min_cells: int = 10) -> np.ndarray:
        t = self.total[: self.n, : self.n].numpy()
        c = self.count[: self.n, : self.n].numpy()
        ts, cs = t + t.T, c + c.T
        s = np.divide(ts, cs, out=np.zeros_like(ts), where=cs > 0)
        s[cs / 2 < min_cells] = 0
        np.fill_diagonal(s, 0)
        return s


def minibatches(model, adata, batch_size=64):
    return iter_minibatches(adata, layer=model.setup_args_["layer"], batch_size=batch_size)


def graph_lookup(model, adata):
    columns, v2g = _graph_genes(adata, model, None)
    assert len(columns) == adata.n_vars
    return torch.as_tensor(v2g), torch.as_tensor(model._column_to_gene(adata))


# --------------------------------------------------------------------------- variants
def masked_rows(model, adata, p, passes, seed=0, all_rows=False):
    """Hide a random share p of each cell's context values; rows: hidden tokens, keys: unhidden gene tokens.

    Returns {"last": acc, "all": acc} (all = layers averaged). With all_rows: no hiding, every token
    a row and key (the harness check: must equal tl.gene_graph).
    """
    module = model.module
    v2g, c2g = graph_lookup(model, adata)
    G = adata.n_vars
    accs = {"last": DirectedAccumulator(G), "all": DirectedAccumulator(G)}
    gen = torch.Generator().manual_seed(seed)
    npre = module.n_prefix
    with model._inference():
        for _ in range(1 if all_rows else passes):
            for idx, x in minibatches(model, adata):
                tokens = module.tokenize(x, c2g)
                n = len(idx)
                ctx = tokens.is_context
                if all_rows:
                    vmask = None
                    hidden = ctx
                    keys = ctx
                else:
                    hidden = (torch.rand(ctx.shape, generator=gen) < p) & ctx
                    vmask = hidden
                    keys = ctx & ~hidden
                phen = torch.full((n, module.n_phenotypes), -1, dtype=torch.long)
                batches = torch.full((n,), -1, dtype=torch.long)
                xx, key_mask = module.embed_tokens(tokens, phen, vmask, batches)
                maps = []
                for block in module.blocks:
                    probs = block.attention.attention_probabilities(block.norm_attention(xx), key_mask)
                    maps.append(probs.mean(1)[:, npre:, npre:].float())
                    xx = block(xx, key_mask)
                genes = v2g[tokens.gene_ids]
                row_genes = genes.masked_fill(~hidden, -1)
                col_genes = genes.masked_fill(~keys, -1)
                scale = ctx.sum(1).float()  # uniform attention over the cell's gene tokens = 1
                accs["last"].add(row_genes, col_genes, maps[-1], scale)
                accs["all"].add(row_genes, col_genes, torch.stack(maps).mean(0), scale)
    return accs


def query_rows(model, adata, n_folds=4, check=True):
    """Queries of each held-out fold's genes over the cell's other genes (as get_normalized_expression).

    Returns {("expressed"|"all", "last"|"all"): acc}: rows = query genes (the cell expresses them /
    every query gene), keys = the cell's context gene tokens; attention computed explicitly from
    each block's qkv weights over the cached keys.
    """
    module = model.module
    v2g, c2g = graph_lookup(model, adata)
    G = adata.n_vars
    folds = model._gene_folds(n_folds)
    npre = module.n_prefix
    accs = {
        (rows, layers): DirectedAccumulator(G) for rows in ("expressed", "all") for layers in ("last", "all")
    }
    checked = not check
    with model._inference():
        for idx, x in minibatches(model, adata):
            n = len(idx)
            dense = x.to_dense()
            expressed = torch.zeros(n, len(model.vocabulary_), dtype=torch.bool)
            known = c2g >= 0
            expressed[:, c2g[known]] = dense[:, known] > 0
            phen = torch.full((n, module.n_phenotypes), -1, dtype=torch.long)
            batches = torch.full((n,), -1, dtype=torch.long)
            for fold in range(n_folds):
                held = folds == fold
                tokens = module.tokenize(x, c2g, held_out=held)
                _, cache, key_mask = module.encode_context(tokens, phen, batches)
                qgenes = torch.nonzero(held).squeeze(1)
                xq = module.query_tokens(qgenes, tokens.held_share)
                maps = []
                for block, (k, v) in zip(module.blocks, cache, strict=True):
                    h = block.norm_attention(xq)
                    d = h.shape[-1]
                    att = block.attention
                    q = F.linear(h, att.qkv.weight[:d], att.qkv.bias[:d])
                    q = q.view(n, len(qgenes), att.n_heads, d // att.n_heads).transpose(1, 2)
                    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
                    s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
                    maps.append(s.softmax(-1).mean(1)[:, :, npre:].float())
                    xq = block.decode(xq, k, v, key_mask)
                if not checked:
                    ref = module.decode_queries(cache, key_mask, qgenes, tokens.held_share)
                    err = (module.norm(xq) - ref).abs().max().item()
                    print(f"  query-stream check vs decode_queries: max abs diff {err:.2e}", flush=True)
                    checked = True
                rows_all = v2g[qgenes][None].expand(n, -1)
                rows_expr = rows_all.masked_fill(~expressed[:, qgenes], -1)
                ctx = tokens.is_context
                col_genes = v2g[tokens.gene_ids].masked_fill(~ctx, -1)
                scale = ctx.sum(1).float()
                avg = torch.stack(maps).mean(0)
                for rows_name, rows in (("expressed", rows_expr), ("all", rows_all)):
                    accs[(rows_name, "last")].add(rows, col_genes, maps[-1], scale)
                    accs[(rows_name, "all")].add(rows, col_genes, avg, scale)
    return accs


# --------------------------------------------------------------------------- scoring (as gene_graph.run)
def evaluate(name, label, score, pearson, gene_types, marker_idx, top_k, n_random, seconds):
    attention_edges = gg.edges(gg.top_k_union(score, top_k))
    n_edges = len(attention_edges)
    pearson_edges = gg.same_count(pearson, n_edges, top_k)
    expected = gg.random_same_type(attention_edges, gene_types, n_random)
    hits = gg.same_type(attention_edges, gene_types)
    p_hits = gg.same_type(pearson_edges, gene_types)
    return {
        "data": name,
        "variant": label,
        "edges": n_edges,
        "same_type": hits,
        "random": expected,
        "enrichment": hits / expected if expected else float("nan"),
        "auroc": gg.auroc(score, marker_idx, gene_types),
        "pearson_same_type": p_hits,
        "pearson_enrichment": p_hits / expected if expected else float("nan"),
        "pearson_auroc": gg.auroc(pearson, marker_idx, gene_types),
        "seconds": seconds,
    }


def trained(adata, tag, max_epochs=None, **kwargs):
    path = MODELS / tag
    if (path / "model.pt").exists() or (path.exists() and any(path.iterdir())):
        try:
            model = sct.GeneTransformer.load(str(path), adata=adata)
            print(f"  loaded {tag}", flush=True)
            return model, float("nan")
        except Exception as e:
            print(f"  could not load {tag}: {e}; retraining", flush=True)
    model = sct.GeneTransformer(adata, **kwargs)
    start = time.perf_counter()
    model.train(max_epochs, enable_progress_bar=False, logger=False)
    minutes = (time.perf_counter() - start) / 60
    model.save(str(path), overwrite=True)
    print(f"  trained {tag} in {minutes:.1f} min", flush=True)
    return model, minutes


def write_table(rows, args):
    lines = [
        f"top_k={args.top_k}, genes={args.genes}, markers={args.markers}, random graphs={args.random_graphs}, "
        f"masked passes={args.passes}, 1 torch thread",
        "",
        "| data | model | variant | edges | same-type | enrichment | AUROC | Pearson same-type | Pearson enrich. "
        "| Pearson AUROC | graph s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['model']} | {r['variant']} | {r['edges']} | {r['same_type']} | "
            f"{r['enrichment']:.2f} | {r['auroc']:.3f} | {r['pearson_same_type']} | "
            f"{r['pearson_enrichment']:.2f} | {r['pearson_auroc']:.3f} | {r['seconds']:.1f} |"
        )
    text = "\n".join(lines)
    (OUT / "results.md").write_text(text + "\n")
    (OUT / "results.json").write_text(json.dumps(rows, indent=1))
    return text


def main():
    global OUT, MODELS
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", nargs="+", default=["pbmc68k", "paul15"])
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--genes", type=int, default=1000)
    parser.add_argument("--markers", type=int, default=25)
    parser.add_argument("--random-graphs", type=int, default=5)
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument(
        "--model", type=json.loads, default={}, help="extra GeneTransformer kwargs for both models"
    )
    parser.add_argument("--tag", default="", help="suffix of the model tags")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    torch.set_num_threads(1)
    OUT = Path(args.out)
    MODELS = OUT / "models"
    MODELS.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.datasets:
        adata, key = gg.load(name, args.genes)
        _, gene_types, marker_idx, pearson = gg.marker_context(adata, key, args.markers)
        sct.setup_anndata(adata)
        print(f"# {name}: {adata.n_obs} cells x {adata.n_vars} genes, {len(marker_idx)} markers", flush=True)

        def add(model_tag, label, score, seconds, context=(name, pearson, gene_types, marker_idx)):
            data_name, corr, types, markers_at = context
            r = evaluate(
                data_name, label, score, corr, types, markers_at, args.top_k, args.random_graphs, seconds
            )
            r["model"] = model_tag
            rows.append(r)
            print(
                f"  {model_tag:8s} {label:34s} edges {r['edges']:5d} same {r['same_type']:4d} "
                f"enr {r['enrichment']:.2f} auroc {r['auroc']:.3f} (Pearson {r['pearson_enrichment']:.2f} "
                f"{r['pearson_auroc']:.3f}) {seconds:.1f}s",
                flush=True,
            )
            write_table(rows, args)

        for model_tag, kwargs in (
            ("default" + args.tag, dict(args.model)),
            ("queries" + args.tag, {**args.model, "expression_queries": 32}),
        ):
            model, _ = trained(adata, f"{name}_{model_tag}", max_epochs=args.max_epochs, **kwargs)
            # 1. baseline: tl.gene_graph defaults (full score, as the benchmark)
            t = time.perf_counter()
            full = sct.tl.gene_graph(adata, model, top_k=adata.n_vars - 1, copy=True)
            add(
                model_tag,
                "baseline tl.gene_graph (last)",
                full.varp["sct_gene_graph"].toarray(),
                time.perf_counter() - t,
            )
            # harness check: all rows through DirectedAccumulator must equal the baseline
            t = time.perf_counter()
            accs = masked_rows(model, adata, 0, 1, all_rows=True)
            sec = time.perf_counter() - t
            check = accs["last"].score()
            base = full.varp["sct_gene_graph"].toarray()
            print(
                f"  harness check: max |own all-rows - tl.gene_graph| = {np.abs(check - base).max():.2e}",
                flush=True,
            )
            add(model_tag, "all rows, all layers", accs["all"].score(), sec)
            # 2. masked rows
            for p in (0.15, 0.5):
                t = time.perf_counter()
                accs = masked_rows(model, adata, p, args.passes, seed=1)
                sec = time.perf_counter() - t
                for layers in ("last", "all"):
                    add(model_tag, f"masked rows p={p} ({layers})", accs[layers].score(), sec)
            # 3. query rows
            if model_tag.startswith("queries"):
                t = time.perf_counter()
                accs = query_rows(model, adata)
                sec = time.perf_counter() - t
                for (rows_name, layers), acc in accs.items():
                    add(model_tag, f"query rows {rows_name} ({layers})", acc.score(), sec)
    print(write_table(rows, args))


if __name__ == "__main__":
    main()
