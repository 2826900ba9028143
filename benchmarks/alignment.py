"""CLIP-style alignment with a second modality, on real cells: recall@k of each cell's partner.

The data sets here have no protein panel, so each cell's genes are split at random into two
halves: the transformer reads the counts of one half, and the "second modality" is 50 principal
components of the other half's log1p-normalised expression (``obsm["X_other"]``). A model with
``align_obsm="X_other"`` is trained (default settings) on 70% of the cells; on the 20% test cells
never seen in training, each cell's aligned transcriptome embedding should retrieve its own
second-modality vector among all test cells, and the other way round. Compared with the
shuffled-pairs control (recall@k about k / n) and with a linear baseline: canonical correlation
analysis (scikit-learn's ``CCA``, 20 components) between 50 PCs of each half, fitted on the same
training cells.

    python benchmarks/alignment.py [--seed 0] [--kang-cells 4000]
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
from sklearn.cross_decomposition import CCA

import sctransformer as sct

warnings.filterwarnings("ignore")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FILES = {"kang18": "kang18_ifnb_pbmc_ctrl_stim.h5ad", "pbmc3k": "pbmc3k_10x_raw.h5ad"}


def halves(name: str, n_cells: int, seed: int) -> tuple[ad.AnnData, np.ndarray]:
    """Counts of one half of the genes, the other half's 50 PCs in ``obsm["X_other"]``, and their PCs."""
    adata = ad.read_h5ad(DATA / FILES[name])
    adata.var_names_make_unique()
    rng = np.random.default_rng(seed)
    if adata.n_obs > n_cells:
        adata = adata[np.sort(rng.choice(adata.n_obs, n_cells, replace=False))].copy()
    sc.pp.filter_genes(adata, min_cells=10)
    genes = rng.permutation(adata.n_vars)
    first, second = np.sort(genes[: adata.n_vars // 2]), np.sort(genes[adata.n_vars // 2 :])

    def pcs(part: ad.AnnData) -> np.ndarray:
        part = part.copy()
        sc.pp.normalize_total(part, target_sum=1e4)
        sc.pp.log1p(part)
        return sc.pp.pca(part.X, n_comps=50, random_state=seed)

    transcriptome = adata[:, first].copy()
    transcriptome.obsm["X_other"] = pcs(adata[:, second]).astype(np.float32)
    return transcriptome, pcs(transcriptome)


def cca_baseline(own_pcs: np.ndarray, other: np.ndarray, train: np.ndarray, test: np.ndarray) -> pd.DataFrame:
    cca = CCA(n_components=20, max_iter=1000).fit(own_pcs[train], other[train])
    a, b = cca.transform(own_pcs[test], other[test])
    cells = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in test]), obsm={"a": a, "b": b})
    return sct.metrics.cross_modal_retrieval(cells, "a", "b")


def run(name: str, args: argparse.Namespace) -> pd.DataFrame:
    adata, own_pcs = halves(name, args.kang_cells, args.seed)
    sct.setup_anndata(adata)
    model = sct.GeneTransformer(adata, align_obsm="X_other", align_dim=64, seed=args.seed)
    start = time.perf_counter()
    model.train(train_size=0.7, validation_size=0.1, seed=args.seed, enable_progress_bar=False)
    minutes = (time.perf_counter() - start) / 60
    test, train = np.sort(model.test_indices), np.sort(model.train_indices)
    cells = adata[test].copy()
    cells.obsm["X_sct_aligned"] = model.get_latent_representation(cells, space="aligned")
    cells.obsm["X_other_aligned"] = model.get_latent_representation(cells, space="aligned_other")
    scores = sct.metrics.cross_modal_retrieval(cells, "X_sct_aligned", "X_other_aligned")
    baseline = cca_baseline(own_pcs, adata.obsm["X_other"], train, test)
    table = pd.concat(
        {
            "sctransformer (aligned)": scores.loc[["a -> b", "b -> a"]],
            "CCA on PCs (linear)": baseline.loc[["a -> b", "b -> a"]],
            "shuffled pairs": scores.loc[["a -> b, shuffled pairs", "b -> a, shuffled pairs"]],
        }
    )
    print(
        f"\n{name}: {adata.n_obs} cells, {adata.n_vars} genes read by the transformer, the other half as 50 PCs; "
        f"{len(test)} test cells; training {minutes:.1f} min"
    )
    with pd.option_context("display.width", 200, "display.precision", 3):
        print(table.to_string())
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kang-cells", type=int, default=4000)
    parser.add_argument("--datasets", nargs="+", default=["kang18", "pbmc3k"])
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads; seed {args.seed}")
    for name in args.datasets:
        run(name, args)


if __name__ == "__main__":
    main()
