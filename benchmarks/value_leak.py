"""Does masked-expression accuracy gain from the visible tokens' bins leaking the hidden tokens' bins?

The tokenizer gives each expressed gene token a per-cell quantile bin, ``floor(n_bins * n_lower /
n_expressed)``, computed among all the cell's expressed genes *before* masking; pre-training hides
~15% of the tokens' bins and predicts them (``expression_accuracy``). On integer counts most hidden
tokens share their exact count with a visible token, and the visible bins were computed with the
hidden genes in the denominator and the ranks, so the visible bins tell the hidden bins in part,
without any gene identity: a leak the masked-expression metric may reward.

Method. For each dataset, two models with the same seed and the default settings: **A**, the
default, and **B2**, trained leak-free: in the training and validation steps (never at inference),
the visible tokens' bins are recomputed among all the cell's expressed genes except the hidden
ones, ``floor(n_bins * n_lower' / (n_expressed - n_hidden))`` with ``n_lower'`` the non-hidden
expressed genes of lower value (genes beyond ``max_length`` still count, as in the tokenizer); the
hidden tokens' target bins are left as they are. This is a small monkeypatch of
``sctransformer.train._plan.mask_tokens`` (the function ``MaskedModelingPlan._step`` calls), undone
after training (try/finally). Then on the test cells, with ``--draws`` fixed mask draws (each
context token hidden with probability 0.15, the same masks for every row), masked-bin accuracy of:
A on normal inputs, A fed B2 inputs, B2 on B2 inputs; the most common bin of the training cells'
tokens; and a rule without gene identity, "predict the mode of the cell's visible bins", on A's
and on B2's visible bins. Plus what the embeddings and the annotation carry: kNN-probe (15
neighbours) cell-type accuracy of ``X_sct`` and held-out macro-F1 / accuracy of the cell-type
token, for A and B2. A self-check asserts that B2's bins with nothing hidden equal the tokenizer's.

Data and split as ``scripts/demo.py``: pbmc68k (``sct.datasets.pbmc68k()``, ``cell_type``) and
paul15 (``paul15_mouse_myeloid_progenitors.h5ad`` in ``shared/data``, ``paul15_celltype``), each
70% train, 10% validation, 20% test (held out from training).

Usage: python benchmarks/value_leak.py [--threads 2] [--seed 0] [--datasets pbmc68k paul15]
       [--draws 5]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

import sctransformer as sct
import sctransformer.train._plan as plan_module
from sctransformer.module._tokenizer import TokenizedCells, Tokenizer

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = {
    "pbmc68k": (None, "cell_type"),
    "paul15": ("paul15_mouse_myeloid_progenitors.h5ad", "paul15_celltype"),
}
MASK_PROB = 0.15
ORIGINAL_MASK_TOKENS = plan_module.mask_tokens


def load(name: str) -> tuple[ad.AnnData, str]:
    """The dataset with its counts in ``layers['counts']``, and its cell-type column."""
    file, key = DATASETS[name]
    if file is None:
        return sct.datasets.pbmc68k(), key
    adata = ad.read_h5ad(DATA / file)
    adata.layers["counts"] = sp.csr_matrix(adata.X).astype(np.float32)
    return adata, key


def leak_free_bins(tokens: TokenizedCells, value_mask: torch.Tensor, n_bins: int) -> torch.Tensor:
    """B2 bins: visible context tokens re-binned among all the cell's expressed genes but the hidden.

    ``floor(n_bins * n_lower' / (n_expressed - n_hidden))``, ``n_lower'``: the cell's expressed
    vocabulary genes (``all_values``, before truncation) of strictly lower value that are not hidden.
    Values are log1p(count / library * 1e4), monotone in the count within a cell, so ranks and ties
    are those of the counts. Hidden tokens (the targets), queries and padding keep their bins.
    """
    hidden = value_mask & tokens.is_context
    n = tokens.gene_ids.shape[0]
    block = Tokenizer._rows(tokens.profile_rows(), tokens.all_values, n, -1.0)  # padded with -1
    ascending = block.sort(dim=1).values
    n_pad = (block.shape[1] - tokens.n_expressed)[:, None]
    v = tokens.values
    n_lower_all = torch.searchsorted(ascending, v.contiguous(), side="left") - n_pad
    # lower[i, j, k]: token k of cell i is hidden and has a lower value than token j
    n_lower_hidden = ((v.unsqueeze(1) < v.unsqueeze(2)) & hidden.unsqueeze(1)).sum(2)
    n_kept = (tokens.n_expressed[:, None] - hidden.sum(1, keepdim=True)).clamp(min=1)
    new = torch.div((n_lower_all - n_lower_hidden) * n_bins, n_kept, rounding_mode="floor")
    return torch.where(tokens.is_context & ~value_mask, new, tokens.bins)


@contextlib.contextmanager
def leak_free_training(n_bins: int) -> Iterator[None]:
    """Within the block, the training and validation steps see B2 bins on their visible tokens.

    ``MaskedModelingPlan._step`` looks ``mask_tokens`` up in the ``_plan`` module's globals right
    after tokenizing; the patched function draws the same masks and then re-bins the visible tokens
    in place. Nothing at inference (embed, predict) calls it. Restored on exit, even on error.
    """
    original = plan_module.mask_tokens

    def mask_tokens(tokens: TokenizedCells, phenotypes: torch.Tensor, **kwargs):
        value_mask, phenotype_mask = original(tokens, phenotypes, **kwargs)
        tokens.bins = leak_free_bins(tokens, value_mask, n_bins)
        return value_mask, phenotype_mask

    plan_module.mask_tokens = mask_tokens
    try:
        yield
    finally:
        plan_module.mask_tokens = original


def self_check(model: sct.GeneTransformer, adata: ad.AnnData) -> None:
    """With nothing hidden, B2's bins are the tokenizer's bins (every position, padding included)."""
    column_to_gene = torch.as_tensor(model._column_to_gene(adata))
    tokens = model.module.tokenize(sct.data.to_torch_csr(adata.layers["counts"][:128]), column_to_gene)
    nothing = torch.zeros_like(tokens.is_token)
    assert torch.equal(leak_free_bins(tokens, nothing, model.module.n_bins), tokens.bins), (
        "B2 bins with nothing hidden differ from the tokenizer's"
    )


def train(adata: ad.AnnData, key: str, seed: int, leak_free: bool) -> sct.GeneTransformer:
    sct.settings.seed = seed
    sct.setup_anndata(adata, layer="counts", phenotype_keys=[key])
    model = sct.GeneTransformer(adata)
    assert model.module.value_encoding == "binned" and model.module.tokenizer.binning == "quantile"
    patch = leak_free_training(model.module.n_bins) if leak_free else contextlib.nullcontext()
    with patch:
        model.train(train_size=0.7, validation_size=0.1, enable_progress_bar=False)
    assert plan_module.mask_tokens is ORIGINAL_MASK_TOKENS, "the patch must be undone after training"
    return model


def annotation(model: sct.GeneTransformer, adata: ad.AnnData, key: str) -> dict[str, float]:
    """kNN-probe accuracy of X_sct and held-out macro-F1 / accuracy of the cell-type token."""
    adata = adata.copy()
    train_idx, test_idx = np.sort(model.train_indices), np.sort(model.test_indices)
    sct.tl.embed(adata, model)
    sct.tl.predict(adata, model)
    labels = adata.obs[key].astype(str).to_numpy()
    predicted = adata.obs[f"sct_{key}"].astype(str).to_numpy()[test_idx]
    scores = sct.metrics.classification_scores(labels[test_idx], predicted, n_bootstrap=1000, seed=0)
    return {
        "knn": sct.metrics.knn_probe_accuracy(adata.obsm["X_sct"], labels, train_idx, test_idx),
        "macro_f1": float(scores.summary.loc["macro_f1", "value"]),
        "accuracy": float(scores.summary.loc["accuracy", "value"]),
    }


def visible_mode(bins: torch.Tensor, value_mask: torch.Tensor, is_context: torch.Tensor, n_bins: int):
    """Each cell's most common visible bin (lowest on ties), broadcast over its tokens."""
    visible = is_context & ~value_mask
    histogram = torch.zeros(bins.shape[0], n_bins, dtype=torch.long)
    histogram.scatter_add_(1, bins.clamp(min=0), visible.long())
    return histogram.argmax(1)[:, None].expand_as(bins)


@torch.no_grad()
def masked_scores(
    model_a: sct.GeneTransformer,
    model_b2: sct.GeneTransformer,
    adata: ad.AnnData,
    draws: int,
    batch_size: int = 128,
) -> dict[str, float]:
    """Masked-bin accuracy on the test cells, pooled over ``draws`` fixed mask draws.

    Draw ``d`` hides each context token of batch ``b0`` with probability 0.15 from a generator seeded
    ``1000 * d + 7 + b0``; every row is scored on the same masks (hidden context tokens).
    """
    assert np.array_equal(np.sort(model_a.test_indices), np.sort(model_b2.test_indices))
    modules = {"A": model_a.module.eval(), "B2": model_b2.module.eval()}
    n_bins = model_a.module.n_bins
    column_to_gene = torch.as_tensor(model_a._column_to_gene(adata))
    train_tokens = model_a.module.tokenize(
        sct.data.to_torch_csr(adata.layers["counts"][np.sort(model_a.train_indices)]), column_to_gene
    )
    common_bin = int(torch.bincount(train_tokens.bins[train_tokens.is_context], minlength=n_bins).argmax())
    counts = adata.layers["counts"][np.sort(model_a.test_indices)]
    hits: dict[str, int] = {}
    total = 0
    for draw in range(draws):
        for b0 in range(0, counts.shape[0], batch_size):
            tokens = modules["A"].tokenize(
                sct.data.to_torch_csr(counts[b0 : b0 + batch_size]), column_to_gene
            )
            generator = torch.Generator().manual_seed(1000 * draw + 7 + b0)
            hidden = (torch.rand(tokens.gene_ids.shape, generator=generator) < MASK_PROB) & tokens.is_context
            target = tokens.bins.clone()
            inputs = {"A": target, "B2": leak_free_bins(tokens, hidden, n_bins)}
            predictions = {}
            for model_name, input_name in (("A", "A"), ("A", "B2"), ("B2", "B2")):
                module = modules[model_name]
                tokens.bins = inputs[input_name]
                phenotypes = torch.full((tokens.gene_ids.shape[0], module.n_phenotypes), -1, dtype=torch.long)
                h = module.encode(tokens, phenotypes, hidden)
                predictions[f"{model_name}|{input_name}"] = module.expression_head(
                    h[:, module.n_prefix :]
                ).argmax(-1)
            tokens.bins = target
            predictions["common"] = torch.full_like(target, common_bin)
            for input_name in ("A", "B2"):
                predictions[f"mode|{input_name}"] = visible_mode(
                    inputs[input_name], hidden, tokens.is_context, n_bins
                )
            for name, prediction in predictions.items():
                hits[name] = hits.get(name, 0) + int((prediction == target)[hidden].sum())
            total += int(hidden.sum())
    out = {name: count / total for name, count in hits.items()}
    out["n_scored"] = total
    out["common_bin"] = common_bin
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--draws", type=int, default=5, help="fixed mask draws on the test cells")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for name in args.datasets:
        models = {}
        for variant in ("A", "B2"):
            adata, key = load(name)  # fresh data for each model, set up alike
            start = time.perf_counter()
            models[variant] = train(adata, key, args.seed, leak_free=variant == "B2")
            print(f"# {name} {variant}: trained in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
            if variant == "A":
                self_check(models["A"], adata)
        masked = masked_scores(models["A"], models["B2"], adata, args.draws)
        probes = {variant: annotation(model, adata, key) for variant, model in models.items()}
        rows.append((name, len(models["A"].test_indices), masked, probes))

    print(
        f"\nmasked-bin accuracy on the test cells ({args.draws} mask draws, p={MASK_PROB}), "
        f"seed {args.seed}, {args.threads} threads; A: default training, B2: trained leak-free"
    )
    print(
        "| dataset | test cells | scored tokens | A, normal inputs | A, B2 inputs | B2, B2 inputs "
        "| most common bin | visible-bin mode, A | visible-bin mode, B2 | kNN X_sct A / B2 "
        "| macro-F1 A / B2 | accuracy A / B2 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, n_test, m, p in rows:
        print(
            f"| {name} | {n_test} | {m['n_scored']} | {m['A|A']:.3f} | {m['A|B2']:.3f} | {m['B2|B2']:.3f} "
            f"| {m['common']:.3f} (bin {m['common_bin']}) | {m['mode|A']:.3f} | {m['mode|B2']:.3f} "
            f"| {p['A']['knn']:.3f} / {p['B2']['knn']:.3f} | {p['A']['macro_f1']:.3f} / {p['B2']['macro_f1']:.3f} "
            f"| {p['A']['accuracy']:.3f} / {p['B2']['accuracy']:.3f} |"
        )


if __name__ == "__main__":
    main()
