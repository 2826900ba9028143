"""Throughput of the tokenizer, a training step and embedding, side by side in one run.

Prints one table. Data: the real pbmc68k counts (700 cells x 765 genes, ~250 expressed genes per
cell) tiled to ``--cells`` cells. Ratios within one run are what to compare across machines.

A second table trains on real kang18 cells (most with 510-1,100 expressed genes; ``max_length=1024``) with
minibatches in random order against length-bucketed minibatches (``train(length_bucketing=True)``):
the same cells and steps, padded to each minibatch's longest cell.

With ``transformers`` installed (``pip install transformers``; not a dependency), each model size
without dropout is also timed as a Hugging Face ``BertModel`` fed the same cells as padded
sequences (the architecture Geneformer uses).

Usage: python benchmarks/throughput.py [--cells 2048] [--batch-size 32] [--bucket-cells 512]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from torch.profiler import record_function

import sctransformer as sct
from sctransformer.data import (
    EpochSeededRandomSampler,
    LengthBucketedSampler,
    expressed_per_cell,
    to_torch_csr,
)
from sctransformer.train import mask_tokens

warnings.filterwarnings("ignore")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def naive_tokenize(
    x: sp.csr_matrix, max_length: int, n_bins: int, gene_scale: np.ndarray
) -> tuple[np.ndarray, ...]:
    """The naive way: a Python loop over cells (numpy per cell), then padding into arrays.

    Does the tokenizer's work (``x``'s columns being the vocabulary's genes): library size,
    expressed genes by decreasing ``count / gene_scale`` (ties by gene; the default
    ``gene_ranking="relative"``), truncation, log1p-normalised values, per-cell quantile bins,
    padded output, and the whole profile (every expressed gene and its value, for ``[PROFILE]``).
    """
    cells, profile_genes, profile_values = [], [], []
    for i in range(x.shape[0]):
        start, stop = x.indptr[i], x.indptr[i + 1]
        counts, genes = x.data[start:stop], x.indices[start:stop]
        library = counts.sum()
        order = np.lexsort((genes, -(counts / gene_scale[genes])))[:max_length]
        n_lower = np.searchsorted(np.sort(counts), counts[order], side="left")
        values = np.log1p(counts[order] / library * 1e4)
        cells.append((genes[order], values, (n_lower * n_bins) // len(counts)))
        profile_genes.append(genes)
        profile_values.append(np.log1p(counts / library * 1e4))
    length = max(len(c[0]) for c in cells)
    gene_ids = np.zeros((len(cells), length), dtype=np.int64)
    values = np.zeros((len(cells), length), dtype=np.float32)
    bins = np.full((len(cells), length), -1, dtype=np.int64)
    for i, (g, v, b) in enumerate(cells):
        gene_ids[i, : len(g)], values[i, : len(g)], bins[i, : len(g)] = g, v, b
    return gene_ids, values, bins, np.concatenate(profile_genes), np.concatenate(profile_values)


def matmul_peak(n: int = 2048, repeat: int = 10) -> float:
    """Measured FLOP/s of a large float32 matrix product on this machine (the utilisation's reference)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / timed(lambda: a @ b, repeat)


def expression_head_flops(d_model: int, n_bins: int, cell_expression: bool = True) -> float:
    """Forward FLOPs per gene token of the gene transformer's expression heads (default settings).

    The expression head (``Linear(d, d)``, ``Linear(d, n_bins)``) and, with the default
    ``cell_expression_loss``, the head predicting each value from the cell summary
    (``Linear(d, n_bins)``), both run on every gene token.
    """
    return 2 * d_model**2 + 2 * d_model * n_bins + (2 * d_model * n_bins if cell_expression else 0)


def train_flops(
    real_lengths: torch.Tensor, *, d_model: int, d_ff: int, n_layers: int, n_prefix: int, head_flops: float
) -> float:
    """Model FLOPs of one training step on the real (not padded) tokens: 3x the forward pass.

    ``real_lengths`` holds each cell's number of gene tokens (``tokens.is_token.sum(1)``);
    ``n_prefix`` tokens per cell come before them. Per layer and token the four attention
    projections and the feed-forward layers (``2 * (4 d^2 + 2 d d_ff)``), per layer and cell the
    attention scores and weighted sum over its real length ``L`` (``4 L^2 d``), and ``head_flops``
    per gene token (:func:`expression_head_flops`); embeddings and the small heads (phenotypes,
    the cell query) are left out, as is usual.
    """
    genes = real_lengths.double()
    lengths = genes + n_prefix
    per_token = n_layers * 2 * (4 * d_model**2 + 2 * d_model * d_ff)
    forward = (
        float(lengths.sum()) * per_token
        + n_layers * 4 * d_model * float((lengths**2).sum())
        + float(genes.sum()) * head_flops
    )
    return 3 * forward


def timed(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


class BertBaseline:
    """A Hugging Face ``BertModel`` of the same size fed the same cells (Geneformer's architecture).

    Input: the cells' gene ids in token order as padded sequences (absolute positions), the same
    attention mask; a linear head predicts the expression bin of 15% masked positions (as the gene
    transformer does). Built once; :meth:`step` trains on one tokenized minibatch.
    """

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        n_genes: int,
        max_length: int,
        device: str | torch.device = "cpu",
        n_heads: int = 4,
    ) -> None:
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=n_genes + 2,  # + [PAD], [MASK]
            hidden_size=d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            intermediate_size=4 * d_model,
            max_position_embeddings=max_length + 1,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=0,
        )
        config._attn_implementation = "sdpa"  # torch's fused attention, as the gene transformer uses
        self.bert = BertModel(config, add_pooling_layer=False).to(device).train()
        self.head = torch.nn.Linear(d_model, 16).to(device)
        self.optimizer = torch.optim.AdamW([*self.bert.parameters(), *self.head.parameters()], lr=1e-4)
        self.generator = torch.Generator(device=device).manual_seed(0)

    def step(self, tokens, autocast: AbstractContextManager | None = None) -> torch.Tensor:
        """One training step on ``tokens`` (under ``autocast``); returns its number of real tokens.

        The count stays a tensor on the device: reading it would wait for the GPU every step.
        """
        with record_function("phase:mask"):
            input_ids = torch.where(tokens.is_token, tokens.gene_ids + 2, 0)
            masked = (
                torch.rand(input_ids.shape, generator=self.generator, device=input_ids.device) < 0.15
            ) & tokens.is_token
        with record_function("phase:forward"), autocast or nullcontext():
            hidden = self.bert(
                input_ids=input_ids.masked_fill(masked, 1), attention_mask=tokens.is_token.long()
            ).last_hidden_state
            target = tokens.bins.clamp(min=0)
            loss = torch.nn.functional.cross_entropy(self.head(hidden[masked]), target[masked])
        with record_function("phase:backward"):
            self.optimizer.zero_grad()
            loss.backward()
        with record_function("phase:optimizer"):
            self.optimizer.step()
        return tokens.is_token.sum()


def make_bert(*args: Any, **kwargs: Any) -> BertBaseline | None:
    """:class:`BertBaseline` of these arguments, or ``None`` without ``transformers`` installed."""
    try:
        return BertBaseline(*args, **kwargs)
    except ImportError:
        return None


def bucketing_rows(n_cells: int, bs: int) -> list[tuple[str, str, str]]:
    """Training steps over the same kang18 cells in random vs length-bucketed minibatches."""
    path = DATA / "kang18_ifnb_pbmc_ctrl_stim.h5ad"
    if not path.exists():
        return [("length bucketing", "skipped", f"{path} not found")]
    adata = ad.read_h5ad(path)[:n_cells].copy()
    sct.setup_anndata(adata)
    model = sct.GeneTransformer(adata, max_length=1024)
    module = model.module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    column_to_gene = torch.as_tensor(model._column_to_gene(adata))
    counts = adata.X.tocsr()
    lengths = np.minimum(expressed_per_cell(adata, layer=None), 1024)
    no_phenotypes = torch.zeros(bs, 0, dtype=torch.long)
    rows, seconds, batches_of = [], {}, {}
    for name, sampler in (
        ("random", EpochSeededRandomSampler(adata.n_obs, seed=0)),
        ("length-bucketed", LengthBucketedSampler(lengths, bs, seed=0)),
    ):
        order = np.array(list(sampler))
        batches = batches_of[name] = [order[i : i + bs] for i in range(0, len(order) - bs + 1, bs)]
        real = padded = 0
        start = time.perf_counter()
        for batch in batches:
            tokens = module.tokenize(to_torch_csr(counts[np.sort(batch)]), column_to_gene)
            value_mask, _ = mask_tokens(tokens, no_phenotypes, gene_mask_prob=0.15, phenotype_mask_prob=0.0)
            hidden = module.encode(tokens, no_phenotypes, value_mask)
            loss = module.loss(hidden, tokens, value_mask, no_phenotypes, no_phenotypes.bool(), []).total
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            real += int(tokens.is_token.sum())
            padded += tokens.is_token.numel()
        seconds[name] = time.perf_counter() - start
        rows.append(
            (
                f"train d=64 L=2 max_length=1024, {name} minibatches",
                f"{len(batches) * bs / seconds[name]:,.1f} cells/s",
                f"{real / seconds[name]:,.0f} real tokens/s; padding {1 - real / padded:.0%} of token slots",
            )
        )

    bert = make_bert(64, 2, len(model.vocabulary_), 1024)  # the random minibatches, padded
    if bert is not None:
        cells = [
            module.tokenize(to_torch_csr(counts[np.sort(b)]), column_to_gene) for b in batches_of["random"]
        ]
        bert.step(cells[0])  # warm-up
        start = time.perf_counter()
        bert_real = float(sum(bert.step(tokens) for tokens in cells))
        bert_seconds = time.perf_counter() - start
        rows.append(
            (
                "train HF BertModel d=64 L=2 max_length=1024, random minibatches (padded)",
                f"{len(cells) * bs / bert_seconds:,.1f} cells/s",
                f"{bert_real / bert_seconds:,.0f} real tokens/s",
            )
        )
        rows.append(
            (
                "length-bucketed sctransformer / padded BERT",
                f"{bert_seconds / seconds['length-bucketed']:.2f}x",
                "cells/s on the same cells",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cells", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bucket-cells", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)

    base = sct.datasets.pbmc68k()
    reps = int(np.ceil(args.cells / base.n_obs))
    adata = base[np.tile(np.arange(base.n_obs), reps)[: args.cells]].copy()
    adata.obs_names_make_unique()
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    counts = adata.layers["counts"].tocsr()
    bs = args.batch_size
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    print(
        f"data: pbmc68k tiled to {adata.n_obs} cells x {adata.n_vars} genes, "
        f"{counts.getnnz(1).mean():.0f} expressed genes per cell; batch size {bs}\n"
    )

    peak = matmul_peak()
    rows = [("fp32 matmul 2048 x 2048 (the peak for utilisation)", f"{peak / 1e9:,.1f} GFLOP/s", "")]
    model = sct.GeneTransformer(adata)
    column_to_gene = torch.as_tensor(model._column_to_gene(adata))
    scale = model.module.tokenizer.gene_scale.numpy()  # the vocabulary is adata's genes, in order
    for tok_bs in (bs, 256):
        tok_batches = [to_torch_csr(counts[i : i + tok_bs]) for i in range(0, adata.n_obs, tok_bs)]
        t_batched = timed(lambda tb=tok_batches: [model.module.tokenize(b, column_to_gene) for b in tb], 3)
        t_naive = timed(
            lambda tok_bs=tok_bs: [
                naive_tokenize(counts[i : i + tok_bs], 256, 16, scale) for i in range(0, adata.n_obs, tok_bs)
            ],
            1,
        )
        rows.append(
            (f"tokenize {tok_bs} cells/batch, batched (torch)", f"{adata.n_obs / t_batched:,.0f} cells/s", "")
        )
        rows.append(
            (
                f"tokenize {tok_bs} cells/batch, per-cell loop (numpy)",
                f"{adata.n_obs / t_naive:,.0f} cells/s",
                f"batched / naive: {t_naive / t_batched:.1f}x",
            )
        )
    batches = [to_torch_csr(counts[i : i + bs]) for i in range(0, adata.n_obs, bs)]

    for d_model, n_layers, dropout in [(64, 2, 0.0), (64, 2, 0.1), (128, 2, 0.0), (256, 4, 0.0)]:
        m = sct.GeneTransformer(adata, d_model=d_model, n_layers=n_layers, n_heads=4, dropout=dropout)
        module = m.module.train()
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
        phenotypes = torch.zeros(bs, 1, dtype=torch.long)
        batch = batches[0]

        def step(module=module, optimizer=optimizer, batch=batch, phenotypes=phenotypes):
            tokens = module.tokenize(batch, column_to_gene)
            value_mask, pheno_mask = mask_tokens(
                tokens, phenotypes, gene_mask_prob=0.15, phenotype_mask_prob=0.5
            )
            hidden = module.encode(tokens, phenotypes.masked_fill(pheno_mask, -1), value_mask)
            loss = module.loss(hidden, tokens, value_mask, phenotypes, pheno_mask, ["cell_type"]).total
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return tokens

        tokens = step()
        t_step = timed(step, 5)
        flops = train_flops(
            tokens.is_token.sum(1),
            d_model=d_model,
            d_ff=4 * d_model,
            n_layers=n_layers,
            n_prefix=module.n_prefix,
            head_flops=expression_head_flops(d_model, module.n_bins, module.cell_expression_loss),
        )
        t_tok = timed(lambda module=module, batch=batch: module.tokenize(batch, column_to_gene), 20)
        n_tokens = int(tokens.is_token.sum())  # real gene tokens, as counted for BERT
        m.module.eval()
        sub = adata[: min(adata.n_obs, 512)].copy()
        t_embed = timed(lambda m=m, sub=sub: m.get_latent_representation(sub, batch_size=64), 1)
        name = f"train step d={d_model} L={n_layers} dropout={dropout}"
        rows.append(
            (
                name,
                f"{bs / t_step:,.0f} cells/s",
                f"{n_tokens / t_step:,.0f} real tokens/s; tokenizer {100 * t_tok / t_step:.1f}% of step; "
                f"model FLOP utilisation {flops / t_step / peak:.0%}",
            )
        )
        rows.append((f"embed d={d_model} L={n_layers}", f"{sub.n_obs / t_embed:,.0f} cells/s", ""))
        if dropout == 0.0:
            bert = make_bert(d_model, n_layers, len(m.vocabulary_), tokens.gene_ids.shape[1])
            if bert is not None:
                bert_tokens = int(tokens.is_token.sum())
                t_bert = timed(lambda bert=bert, tokens=tokens: bert.step(tokens), 5)
                rows.append(
                    (
                        f"train step HF BertModel d={d_model} L={n_layers}, padded",
                        f"{bs / t_bert:,.0f} cells/s",
                        f"{bert_tokens / t_bert:,.0f} real tokens/s; sctransformer / BERT: "
                        f"{t_bert / t_step:.2f}x (same cells)",
                    )
                )

    rows += bucketing_rows(args.bucket_cells, bs)
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'what':<{width}}{'throughput':>16}   notes")
    for what, value, note in rows:
        print(f"{what:<{width}}{value:>16}   {note}")


if __name__ == "__main__":
    main()
