"""Batch integration, scIB metrics: sctransformer's batch_correction modes against PCA, scVI and Harmony.

Two data sets from ``../shared/data``, one run, one table each:

- ``cellbench``: the singlet (``SNG``) cells of 5 batches (CEL-seq2 and Drop-seq) of 5 cell lines;
  mix ``batch``, keep ``cell_line`` apart.
- ``kang18``: PBMCs, control and interferon-stimulated; mix ``condition``, keep the cell types of
  the 832 labelled cells apart. Methods see ``--kang-cells`` cells in all (default 3,000, for CPU
  time): the labelled ones and others drawn at random; metrics use the labelled cells.

Every method gets the same genes (the 2,000 most variable, scanpy's ``seurat_v3`` on counts, batch
aware): PCA (50 components of log1p-normalised counts), Harmony on those components (harmonypy),
scVI (scvi-tools, default settings) and sctransformer with default settings for each
``batch_correction`` (``none``, ``token``, ``adversarial``, ``both``), no labels given to any.

    python benchmarks/integration.py [--out integration_out] [--seed 0]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import torch

import sctransformer as sct

warnings.filterwarnings("ignore")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MODES = ("none", "token", "adversarial", "both")


def load(name: str, kang_cells: int, seed: int) -> tuple[ad.AnnData, str, str]:
    """Counts (CSR, integers), batch key and label key of a benchmark data set."""
    if name == "cellbench":
        adata = ad.read_h5ad(DATA / "cellbench_tian19_celllines_5batches.h5ad")
        adata = adata[adata.obs["demuxlet_cls"] == "SNG"].copy()
        return adata, "batch", "cell_line"
    adata = ad.read_h5ad(DATA / "kang18_ifnb_pbmc_ctrl_stim.h5ad")
    labelled = np.flatnonzero(adata.obs["seurat_annotations_partial"].notna().to_numpy())
    others = np.setdiff1d(np.arange(adata.n_obs), labelled)
    rng = np.random.default_rng(seed)
    extra = rng.choice(others, size=max(0, kang_cells - len(labelled)), replace=False)
    return adata[np.sort(np.concatenate([labelled, extra]))].copy(), "condition", "seurat_annotations_partial"


def prepare(adata: ad.AnnData, batch_key: str) -> ad.AnnData:
    """The 2,000 most variable genes (counts in ``layers["counts"]``) and 50 PCs in ``obsm["X_pca"]``."""
    adata.layers["counts"] = adata.X.copy()
    sc.pp.highly_variable_genes(
        adata, n_top_genes=2000, flavor="seurat_v3", batch_key=batch_key, layer="counts"
    )
    adata = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    adata.X = adata.layers["counts"].astype(np.float32)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=50, random_state=0)
    return adata


def harmony(adata: ad.AnnData, batch_key: str) -> np.ndarray:
    import harmonypy

    out = harmonypy.run_harmony(adata.obsm["X_pca"], adata.obs, [batch_key], random_state=0, verbose=False)
    z = np.asarray(out.Z_corr)
    return z.T if z.shape[0] != adata.n_obs else z


def scvi_embedding(adata: ad.AnnData, batch_key: str, seed: int) -> np.ndarray:
    import scvi

    scvi.settings.seed = seed
    data = ad.AnnData(X=adata.layers["counts"].copy(), obs=adata.obs[[batch_key]].copy())
    scvi.model.SCVI.setup_anndata(data, batch_key=batch_key)
    model = scvi.model.SCVI(data)
    model.train(enable_progress_bar=False)
    return model.get_latent_representation()


def sct_embedding(adata: ad.AnnData, batch_key: str, mode: str, seed: int) -> np.ndarray:
    data = ad.AnnData(
        X=adata.layers["counts"].copy(), obs=adata.obs[[batch_key]].copy(), var=adata.var[[]].copy()
    )
    sct.setup_anndata(data, batch_key=batch_key)
    model = sct.GeneTransformer(data, batch_correction=mode, seed=seed)
    model.train(seed=seed, enable_progress_bar=False)
    return model.get_latent_representation()


def run(name: str, args: argparse.Namespace) -> pd.DataFrame:
    adata, batch_key, label_key = load(name, args.kang_cells, args.seed)
    adata = prepare(adata, batch_key)
    print(f"\n{name}: {adata.n_obs} cells x {adata.n_vars} genes, {adata.obs[batch_key].nunique()} batches "
          f"({batch_key}), {adata.obs[label_key].notna().sum()} labelled cells ({label_key})", flush=True)  # fmt: skip
    seconds = {"X_pca": 0.0}
    start = time.perf_counter()
    adata.obsm["Harmony"] = harmony(adata, batch_key)
    seconds["Harmony"] = time.perf_counter() - start
    start = time.perf_counter()
    adata.obsm["scVI"] = scvi_embedding(adata, batch_key, args.seed)
    seconds["scVI"] = time.perf_counter() - start
    for mode in MODES:
        key = f"sct_{mode}"
        start = time.perf_counter()
        adata.obsm[key] = sct_embedding(adata, batch_key, mode, args.seed)
        seconds[key] = time.perf_counter() - start
        print(f"  {key}: {seconds[key] / 60:.1f} min", flush=True)
    keys = ["X_pca", "Harmony", "scVI", *[f"sct_{m}" for m in MODES]]
    results = sct.metrics.integration(adata, batch_key=batch_key, label_key=label_key, embeddings=keys)
    results["training min"] = [seconds[k] / 60 for k in results.index]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results.to_csv(out / f"{name}_scib.csv")
    sct.pl.integration(results.drop(columns="training min"), show=False, return_fig=True).savefig(
        out / f"{name}_scib.png", dpi=120
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="integration_out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kang-cells", type=int, default=3000, help="kang18 cells in all: the 832 labelled ones and others"
    )
    parser.add_argument("--datasets", nargs="+", default=["cellbench", "kang18"])
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads; seed {args.seed}")
    for name in args.datasets:
        results = run(name, args)
        columns = [c for c in results.columns if c not in ("Bio conservation", "Batch correction", "Total")]
        columns += ["Bio conservation", "Batch correction", "Total"]
        with pd.option_context("display.width", 250, "display.max_columns", 30, "display.precision", 3):
            print(results[columns].sort_values("Total", ascending=False).to_string())


if __name__ == "__main__":
    main()
