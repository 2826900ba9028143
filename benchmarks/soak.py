"""Soak test: train for many epochs and check that the process's memory stays flat.

Trains a small model with phenotype prediction, validation and per-epoch checkpoints (every code
path a long run exercises) on a synthetic data set, and records the resident set size (RSS) of
the process at the end of every epoch. Memory that grows epoch after epoch (a leak: kept graphs,
growing histories, cached tensors) shows up as RSS above the first epoch's. Prints a table and
exits with status 1 when the peak RSS after the first epoch exceeds it by more than ``--tolerance``.

Usage: python benchmarks/soak.py [--cells 2000] [--genes 1000] [--epochs 100] [--tolerance 0.05]
"""

from __future__ import annotations

import argparse
import gc
import logging
import platform
import sys
import tempfile
import time
import warnings

import lightning.pytorch as pl
import psutil
import torch

import sctransformer as sct

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class MemoryRecorder(pl.Callback):
    """Resident set size (MiB) of this process after each training epoch (and its validation)."""

    def __init__(self) -> None:
        self.rss_mib: list[float] = []
        self.seconds: list[float] = []
        self._start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        gc.collect()
        self.rss_mib.append(psutil.Process().memory_info().rss / 2**20)
        self.seconds.append(time.perf_counter() - self._start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--genes", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    adata = sct.datasets.synthetic(args.cells, args.genes, n_cell_types=8, n_markers=20, mean_counts=2000)
    sct.setup_anndata(adata, layer="counts", batch_key="batch", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, d_model=32, n_layers=2, n_heads=2, max_length=128)
    recorder = MemoryRecorder()
    with tempfile.TemporaryDirectory() as checkpoints:
        model.train(
            max_epochs=args.epochs,
            batch_size=64,
            checkpoint_dir=checkpoints,
            callbacks=[recorder],
            enable_progress_bar=False,
            logger=False,
        )
    first, later = recorder.rss_mib[0], recorder.rss_mib[1:]
    growth = (max(later) - first) / first if later else 0.0

    print(f"# soak: {args.cells} cells x {args.genes} genes, {args.epochs} epochs, {args.threads} threads")
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, sctransformer {sct.__version__}"
    )
    print("| epoch | RSS (MiB) | vs epoch 1 | elapsed (s) |")
    print("|---|---|---|---|")
    for epoch, (rss, sec) in enumerate(zip(recorder.rss_mib, recorder.seconds, strict=True), start=1):
        print(f"| {epoch} | {rss:.0f} | {rss / first - 1:+.1%} | {sec:.0f} |")
    verdict = "flat" if growth <= args.tolerance else "GROWING"
    print(f"\npeak RSS after epoch 1: {growth:+.1%} of epoch 1 (tolerance {args.tolerance:.0%}): {verdict}")
    return 0 if growth <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
