"""End-to-end demo on bundled real data (scanpy's pbmc68k_reduced, counts recovered).

Trains a GeneTransformer with cell-type tokens, embeds and annotates the cells, plots, saves and
reloads the model, and compares the cell-type macro-F1 on held-out cells (never seen in training)
with logistic regression on log1p-normalised counts of all genes, fitted on the same training cells.

Usage: python scripts/demo.py [--out demo_out] [--max-epochs N]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import scanpy as sc
import torch
from sklearn.decomposition import PCA

import sctransformer as sct


def most_common_bin_rate(model: sct.GeneTransformer, adata) -> float:
    """Share of all gene tokens that fall in the most common expression bin."""
    column_to_gene = torch.as_tensor(model._column_to_gene(adata))
    tokens = model.module.tokenize(sct.data.to_torch_csr(adata.layers["counts"]), column_to_gene)
    bins = tokens.bins[tokens.is_token]
    return float(torch.bincount(bins).max() / bins.numel())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="demo_out", help="output directory")
    parser.add_argument("--max-epochs", type=int, default=None, help="training epochs (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sc.settings.figdir = out
    sct.settings.seed = args.seed

    adata = sct.datasets.pbmc68k()
    print(
        f"data: pbmc68k, {adata.n_obs} cells x {adata.n_vars} genes, {adata.obs['cell_type'].nunique()} cell types"
    )
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata)
    print(model)

    start = time.perf_counter()
    # 70% train, 10% validation (curves), 20% test: held out from training altogether
    model.train(max_epochs=args.max_epochs, train_size=0.7, validation_size=0.1, enable_progress_bar=False)
    train_minutes = (time.perf_counter() - start) / 60
    train_threads = torch.get_num_threads()  # scanpy's neighbours change it later
    # the validation cells only feed the curves (no early stopping, no selection), so the baseline
    # is fitted on exactly the cells the model was fitted on
    train_idx = np.sort(model.train_indices)
    test_idx = np.sort(model.test_indices)

    sct.tl.embed(adata, model)
    sct.tl.predict(adata, model)

    all_labels = adata.obs["cell_type"].astype(str).to_numpy()
    pca50 = PCA(n_components=50, random_state=0).fit_transform(
        sct.metrics.log1p_normalise(adata.layers["counts"]).toarray()
    )
    truth = all_labels[test_idx]
    predicted = adata.obs["sct_cell_type"].astype(str).to_numpy()[test_idx]
    log1p_counts = sct.metrics.log1p_normalise(adata.layers["counts"])
    baseline = sct.metrics.logistic_regression_baseline(log1p_counts, all_labels, train_idx, test_idx)
    ours = sct.metrics.classification_scores(truth, predicted, n_bootstrap=1000, seed=0)
    theirs = sct.metrics.classification_scores(truth, baseline, n_bootstrap=1000, seed=0)
    test = adata[test_idx]
    ece = {}
    for calibrated in (False, True):
        table = model.predict(test, calibrated=calibrated)
        correct = table["cell_type"].astype(str).to_numpy() == truth
        ece[calibrated] = sct.metrics.expected_calibration_error(table["cell_type_confidence"], correct)
    summary = {
        "n_test_cells": len(test_idx),
        "train_minutes": round(train_minutes, 2),
        "sctransformer_macro_f1": round(float(ours.summary.loc["macro_f1", "value"]), 3),
        "sctransformer_macro_f1_ci95": ours.format("macro_f1"),
        "sctransformer_accuracy": round(float(ours.summary.loc["accuracy", "value"]), 3),
        "logreg_macro_f1": round(float(theirs.summary.loc["macro_f1", "value"]), 3),
        "logreg_macro_f1_ci95": theirs.format("macro_f1"),
        "logreg_accuracy": round(float(theirs.summary.loc["accuracy", "value"]), 3),
        "test_ece_raw": round(ece[False], 3),
        "test_ece_calibrated": round(ece[True], 3),
        # how much cell-type information the embeddings carry: kNN fitted on the training cells
        "knn_accuracy_X_sct": round(
            sct.metrics.knn_probe_accuracy(adata.obsm["X_sct"], all_labels, train_idx, test_idx), 3
        ),
        "knn_accuracy_pca50": round(
            sct.metrics.knn_probe_accuracy(pca50, all_labels, train_idx, test_idx), 3
        ),
        # how much the model learned about expression: masked-bin accuracy on validation cells
        # against always predicting the most common bin of the tokens
        "masked_expression_accuracy": round(
            float(model.history["expression_accuracy_validation"].iloc[-1, 0]), 3
        ),
        "most_common_bin_rate": round(most_common_bin_rate(model, adata), 3),
    }

    sct.pl.embedding(
        adata, color=["cell_type", "sct_cell_type", "n_genes"], wspace=0.6, show=False, return_fig=True
    ).savefig(out / "embedding_umap.png", dpi=110, bbox_inches="tight")
    sct.pl.training_history(model, show=False, return_fig=True).savefig(
        out / "training_history.png", dpi=110, bbox_inches="tight"
    )
    sct.pl.confusion_matrix(test, "cell_type", "sct_cell_type", show=False, return_fig=True).savefig(
        out / "confusion_matrix.png", dpi=110, bbox_inches="tight"
    )
    sct.pl.calibration(test, "cell_type", "sct_cell_type", show=False, return_fig=True).savefig(
        out / "calibration.png", dpi=110, bbox_inches="tight"
    )

    model.save(out / "pbmc_model", overwrite=True)
    reloaded = sct.GeneTransformer.load(out / "pbmc_model", adata=adata)
    same = np.allclose(reloaded.get_latent_representation(adata), adata.obsm["X_sct"], atol=1e-6)
    summary["reload_gives_same_embedding"] = bool(same)

    adata.write_h5ad(out / "pbmc68k_sct.h5ad")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    print(f"\nheld-out cell-type annotation (pbmc68k, {len(test_idx)} test cells never seen in training)")
    print(f"  {'method':<46}{'macro-F1 [95% bootstrap CI]':>28}{'accuracy':>10}")
    print(
        f"  {'sctransformer (masked cell-type token)':<46}{summary['sctransformer_macro_f1_ci95']:>28}{summary['sctransformer_accuracy']:>10.3f}"
    )
    print(
        f"  {'logistic regression, log1p counts, all genes':<46}{summary['logreg_macro_f1_ci95']:>28}{summary['logreg_accuracy']:>10.3f}"
    )
    print(
        f"expected calibration error of the test predictions: {summary['test_ece_raw']:.3f} raw, "
        f"{summary['test_ece_calibrated']:.3f} with the temperature fitted on the validation cells"
    )
    print(
        f"masked-expression accuracy (validation cells) {summary['masked_expression_accuracy']:.3f}; "
        f"always predicting the most common bin: {summary['most_common_bin_rate']:.3f}"
    )
    print(
        f"kNN (15 neighbours) cell-type accuracy of the embeddings on the test cells: "
        f"X_sct {summary['knn_accuracy_X_sct']:.3f}, 50 PCs of log1p counts {summary['knn_accuracy_pca50']:.3f}"
    )
    print(
        f"training: {train_minutes:.1f} min on {platform.machine()} with {train_threads} torch threads; "
        f"reloading the saved model gives the same embedding: {same}"
    )
    print(
        f"wrote {out}/pbmc68k_sct.h5ad (obsm['X_sct'], obs['sct_cell_type'], obs['sct_cell_type_confidence']),"
    )
    print(
        f"      {out}/embedding_umap.png, {out}/training_history.png, {out}/confusion_matrix.png,\n"
        f"      {out}/calibration.png, {out}/pbmc_model/, {out}/summary.json"
    )


if __name__ == "__main__":
    main()
