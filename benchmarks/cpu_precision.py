"""bf16 mixed precision on the CPU: speed of a training step and quality of a trained model, against float32.

CPUs with bf16 matrix units (Intel AMX on Xeon Sapphire Rapids and later; AVX512-BF16 elsewhere)
multiply bf16 matrices several times faster than float32 ones. ``train(precision="bf16-mixed")``
runs Lightning's CPU autocast: matrix products in bf16, weights, optimiser and losses in float32.

Part 1 (speed), one table: the largest matmul rate in each dtype, and cells/s of one training step
(tokenize, forward, losses, backward, AdamW) of three model sizes on the same pbmc68k minibatch,
float32 against bf16 autocast, timed alternately in one run.

Part 2 (quality): the demo's setting (pbmc68k, cell-type token, 70/10/20 split, default model and
epochs) trained with each precision for ``--seeds``: training minutes, masked-expression accuracy
on the validation cells and cell-type macro-F1 on the held-out test cells (inference in float32).

Usage: python benchmarks/cpu_precision.py [--seeds 0 1] [--threads 2] [--skip-quality]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch

import sctransformer as sct
from sctransformer.data import to_torch_csr
from sctransformer.train import mask_tokens

warnings.filterwarnings("ignore")


def matmul_rate(dtype: torch.dtype, n: int = 2048, repeat: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * n**3 * repeat / (time.perf_counter() - start)


def step_rates(adata, d_model: int, n_layers: int, repeat: int = 6, bs: int = 32) -> dict[str, float]:
    """Cells/s of a training step in float32 and under bf16 autocast, timed alternately."""
    model = sct.GeneTransformer(adata, d_model=d_model, n_layers=n_layers, n_heads=4)
    module = model.module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    column_to_gene = torch.as_tensor(model._column_to_gene(adata))
    batch = to_torch_csr(adata.layers["counts"][:bs].tocsr())
    phenotypes = torch.zeros(bs, 1, dtype=torch.long)

    def step(autocast) -> None:
        tokens = module.tokenize(batch, column_to_gene)
        value_mask, masked = mask_tokens(tokens, phenotypes, gene_mask_prob=0.15, phenotype_mask_prob=0.5)
        with autocast:
            hidden = module.encode(tokens, phenotypes.masked_fill(masked, -1), value_mask)
            loss = module.loss(hidden, tokens, value_mask, phenotypes, masked, ["cell_type"]).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    contexts = {"float32": nullcontext, "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    seconds = {name: [] for name in contexts}
    for context in contexts.values():  # warm-up
        step(context())
    for _ in range(repeat):
        for name, context in contexts.items():
            start = time.perf_counter()
            step(context())
            seconds[name].append(time.perf_counter() - start)
    return {name: bs / float(np.median(s)) for name, s in seconds.items()}


def quality(seed: int, precision: str) -> dict[str, float]:
    """Train the demo's model with ``precision``; test macro-F1 and validation masked accuracy."""
    sct.settings.seed = seed
    adata = sct.datasets.pbmc68k()
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata)
    start = time.perf_counter()
    model.train(
        train_size=0.7, validation_size=0.1, precision=precision, enable_progress_bar=False, logger=None
    )
    minutes = (time.perf_counter() - start) / 60
    test = np.sort(model.test_indices)
    predicted = model.predict(adata[test].copy())["cell_type"].astype(str).to_numpy()
    truth = adata.obs["cell_type"].astype(str).to_numpy()[test]
    scores = sct.metrics.classification_scores(truth, predicted, n_bootstrap=10, seed=0)
    accuracy = model.history["expression_accuracy_validation"].iloc[-1, 0]
    return {
        "minutes": minutes,
        "masked accuracy (val)": float(accuracy),
        "macro-F1 (test)": float(scores.summary.loc["macro_f1", "value"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# {platform.processor() or platform.machine()}, {args.threads} torch threads, torch {torch.__version__}"
    )
    adata = sct.datasets.pbmc68k()
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])

    print("\n| what | float32 | bf16 | bf16 / float32 |\n|---|---|---|---|")
    fp32, bf16 = matmul_rate(torch.float32), matmul_rate(torch.bfloat16)
    print(f"| matmul 2048^3, GFLOP/s | {fp32 / 1e9:,.0f} | {bf16 / 1e9:,.0f} | {bf16 / fp32:.2f}x |")
    for d_model, n_layers in ((64, 2), (128, 2), (256, 4)):
        rates = step_rates(adata, d_model, n_layers)
        print(
            f"| train step d={d_model} L={n_layers}, cells/s | {rates['float32']:,.0f} | {rates['bf16']:,.0f} | "
            f"{rates['bf16'] / rates['float32']:.2f}x |"
        )
    if args.skip_quality:
        return
    print("\n| precision | seed | minutes | masked accuracy (val) | macro-F1 (test) |\n|---|---|---|---|---|")
    for seed in args.seeds:
        for precision in ("32-true", "bf16-mixed"):
            q = quality(seed, precision)
            print(
                f"| {precision} | {seed} | {q['minutes']:.2f} | {q['masked accuracy (val)']:.3f} | "
                f"{q['macro-F1 (test)']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
