"""Two trials behind the integration notes, on cellbench (all genes, singlets, 10 epochs, seed 0).

1. The batch discriminator's learning rate: ``adversary_lr_factor`` 1 against 10 (the default),
   with ``batch_correction="adversarial"``; against no correction.
2. A full-profile reconstruction loss on the cell embedding (a linear decoder to the log1p profile
   of every vocabulary gene, mean-squared error), added to masked modelling for this trial only
   (by wrapping the module's loss; it is not part of sctransformer).

Reported: the discriminator's last training accuracy, and 3-fold kNN (15 neighbours) accuracy of
the cell embedding for the batch (lower is better mixed) and the cell line (higher is better), next
to 50 PCs of the 2,000 most variable genes.

    python benchmarks/integration_trials.py
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import anndata as ad
import scanpy as sc
import torch
import torch.nn.functional as F
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

import sctransformer as sct
from sctransformer.module import GeneTransformerModule

warnings.filterwarnings("ignore")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def knn(z, labels) -> float:
    return float(cross_val_score(KNeighborsClassifier(15), z, labels, cv=3).mean())


def with_reconstruction(loss):
    """The module's loss plus the reconstruction of the whole profile from the cell embedding."""

    def wrapped(self, hidden, tokens, *args, **kwargs):
        out = loss(self, hidden, tokens, *args, **kwargs)
        if hasattr(self, "reconstruction"):
            prediction = self.reconstruction(self.cell_embedding(hidden, tokens))
            target = torch.zeros_like(prediction)
            rows = torch.repeat_interleave(torch.arange(len(prediction)), tokens.n_expressed)
            target[rows, tokens.all_genes] = tokens.all_values.to(prediction.dtype)
            term = F.mse_loss(prediction, target) * prediction.shape[1] / 100
            out.components["reconstruction"] = term
            out.counts["reconstruction"] = len(prediction)
            out.total = out.total + term
        return out

    return wrapped


def main() -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    adata = ad.read_h5ad(DATA / "cellbench_tian19_celllines_5batches.h5ad")
    adata = adata[adata.obs["demuxlet_cls"] == "SNG"].copy()
    pcs = adata.copy()
    sc.pp.normalize_total(pcs, target_sum=1e4)
    sc.pp.log1p(pcs)
    sc.pp.highly_variable_genes(pcs, n_top_genes=2000)
    z = sc.pp.pca(pcs[:, pcs.var["highly_variable"].to_numpy()].X.toarray(), 50)
    rows = [("50 PCs of 2,000 HVGs", "", knn(z, adata.obs["batch"]), knn(z, adata.obs["cell_line"]))]
    sct.setup_anndata(adata, batch_key="batch")
    GeneTransformerModule.loss = with_reconstruction(GeneTransformerModule.loss)
    for name, mode, factor, reconstruct in [
        ("no correction", "none", 10.0, False),
        ("adversarial, discriminator lr 1x", "adversarial", 1.0, False),
        ("adversarial, discriminator lr 10x", "adversarial", 10.0, False),
        ("no correction + profile reconstruction", "none", 10.0, True),
    ]:
        model = sct.GeneTransformer(adata, batch_correction=mode)
        if reconstruct:
            model.module.reconstruction = torch.nn.Linear(64, len(model.vocabulary_))
        model.train(max_epochs=10, adversary_lr_factor=factor, enable_progress_bar=False)
        accuracy = model.history.get("batch_adversary_accuracy_train")
        z = model.get_latent_representation()
        rows.append(
            (
                name,
                "" if accuracy is None else f"{float(accuracy.iloc[-1, 0]):.3f}",
                knn(z, adata.obs["batch"]),
                knn(z, adata.obs["cell_line"]),
            )
        )
    print(f"{'embedding':<42}{'discriminator acc.':>20}{'batch kNN':>11}{'cell-line kNN':>15}")
    for name, accuracy, batch, line in rows:
        print(f"{name:<42}{accuracy:>20}{batch:>11.3f}{line:>15.3f}")


if __name__ == "__main__":
    main()
