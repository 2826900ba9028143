"""Cell annotation, reference -> query, on every labelled data set: sctransformer against simple baselines.

One run, one table: method x data set -> macro-F1 [95% bootstrap CI], accuracy, minutes of CPU
training. Each data set has a fixed, documented split into a labelled reference (fitting; for
sctransformer, 10% of it is the validation set that calibrates the confidences) and a query
(reported only, never used to choose anything):

- ``pbmc68k`` (scanpy's pbmc68k_reduced, 10 ``bulk_labels``): stratified random 80% / 20% (seed 0;
  the data has no donors to hold out).
- ``paul15`` (mouse myeloid progenitors, 10 ``paul15_celltype``): stratified random 80% / 20% (seed 0).
- ``cellbench`` (5 cell lines, ``demuxlet_cls == "SNG"`` cells): reference = the four CEL-seq2
  batches, query = the Drop-seq batch (another protocol).
- ``kang18`` (PBMCs, the 832 cells with ``seurat_annotations_partial``): reference = control cells,
  query = interferon-stimulated cells.

Methods: sctransformer from scratch at default settings; sctransformer pre-trained without labels
on the other data sets' cells (restricted to the genes the target shares with them; paul15 is
mouse and has no partner) and fine-tuned on the reference with ``load_query_data``; logistic
regression on log1p-normalised counts of all genes, on 2,000 HVGs and on 50 PCs; kNN on 50 PCs
(:func:`sctransformer.metrics.annotation_baselines`). Calibration (expected calibration error of
the query predictions before and after temperature scaling) is reported for sctransformer.

Usage: python benchmarks/annotation.py [--threads 2] [--datasets pbmc68k paul15 ...]
       [--pretrain-epochs 3 | --no-pretrain] [--seed 0] [--json results.json]
       [--model '<GeneTransformer kwargs JSON, e.g. {"gene_prediction": 0.15}>'] [--swa 3e-4]

``--seed`` sets ``sct.settings.seed`` (weight initialisation, masks, the order of the cells and the
reference's training / validation split); the reference / query split stays fixed.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from lightning.pytorch.callbacks import StochasticWeightAveraging
from sklearn.model_selection import train_test_split

import sctransformer as sct
from sctransformer.metrics import annotation_baselines, classification_scores, expected_calibration_error

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
QUIET = {"enable_progress_bar": False, "logger": False}
#: ``--swa``: learning rate of Lightning's stochastic weight averaging over the second half of each training run.
SWA_LRS: float | None = None


def quiet() -> dict:
    """Training keywords: no progress bar or logger; with ``--swa``, a fresh weight-averaging callback."""
    if SWA_LRS is None:
        return dict(QUIET)
    return QUIET | {
        "callbacks": [StochasticWeightAveraging(swa_lrs=SWA_LRS, swa_epoch_start=0.5, annealing_epochs=1)]
    }


def _read(name: str) -> ad.AnnData:
    return ad.read_h5ad(DATA / name)


def load(name: str) -> tuple[ad.AnnData, ad.AnnData, str]:
    """Reference and query AnnData (counts in ``X``, gene symbols or Ensembl ids) and the label key."""
    if name == "pbmc68k":
        adata = sct.datasets.pbmc68k()
        adata.X = adata.layers.pop("counts")
        key = "cell_type"
    elif name == "paul15":
        adata = _read("paul15_mouse_myeloid_progenitors.h5ad")
        key = "paul15_celltype"
    elif name == "cellbench":
        adata = _read("cellbench_tian19_celllines_5batches.h5ad")
        adata = adata[adata.obs["demuxlet_cls"] == "SNG"].copy()
        key = "cell_line"
        query = (adata.obs["protocol"] == "Drop-seq").to_numpy()
        return adata[~query].copy(), adata[query].copy(), key
    elif name == "kang18":
        adata = _read("kang18_ifnb_pbmc_ctrl_stim.h5ad")
        adata = adata[adata.obs["seurat_annotations_partial"].notna()].copy()
        key = "seurat_annotations_partial"
        query = (adata.obs["condition"] == "stim").to_numpy()
        return adata[~query].copy(), adata[query].copy(), key
    else:
        raise ValueError(f"unknown data set {name!r}")
    ref, query = train_test_split(
        np.arange(adata.n_obs), test_size=0.2, random_state=0, stratify=adata.obs[key]
    )
    return adata[np.sort(ref)].copy(), adata[np.sort(query)].copy(), key


def pretraining_corpus(name: str, genes: list[str]) -> ad.AnnData | None:
    """Unlabelled cells of the other data sets, on the genes they share with ``name``'s.

    pbmc68k <- pbmc3k + kang18; kang18 <- pbmc3k (pbmc68k's 765 genes would shrink the vocabulary);
    cellbench <- pbmc3k (Ensembl ids); paul15 (mouse) has no partner.
    """
    if name == "paul15":
        return None  # the only mouse data set
    parts = []
    pbmc3k = _read("pbmc3k_10x_raw.h5ad")
    if name == "cellbench":  # Ensembl ids
        pbmc3k.var_names = pbmc3k.var["gene_ids"].astype(str)
    else:
        pbmc3k.var_names = pbmc3k.var["gene_symbols"].astype(str)
    pbmc3k.var_names_make_unique()
    parts.append(pbmc3k)
    if name == "pbmc68k":  # kang18's own cells are its query's donors: not used for kang18
        parts.append(_read("kang18_ifnb_pbmc_ctrl_stim.h5ad"))
    shared = [g for g in genes if all(g in p.var_names for p in parts)]
    corpus = ad.concat([p[:, shared] for p in parts], join="inner", label="source")
    corpus.obs_names_make_unique()
    corpus.obs = corpus.obs[["source"]].copy()
    return corpus


def score(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float | str]:
    report = classification_scores(truth, predicted, n_bootstrap=1000, seed=0)
    s = report.summary
    return {
        "macro_f1": float(s.loc["macro_f1", "value"]),
        "macro_f1_ci": (float(s.loc["macro_f1", "ci_low"]), float(s.loc["macro_f1", "ci_high"])),
        "accuracy": float(s.loc["accuracy", "value"]),
    }


def calibration(model: sct.GeneTransformer, query: ad.AnnData, key: str) -> dict[str, float]:
    truth = query.obs[key].astype(str).to_numpy()
    out = {}
    for calibrated in (False, True):
        table = model.predict(query, calibrated=calibrated)
        correct = table[key].astype(str).to_numpy() == truth
        out["ece_calibrated" if calibrated else "ece_raw"] = expected_calibration_error(
            table[f"{key}_confidence"].to_numpy(), correct
        )
    out["temperature"] = model.temperatures_.get(key, 1.0)
    return out


def run_dataset(name: str, pretrain_epochs: int, model_kwargs: dict | None = None) -> list[dict]:
    ref, query, key = load(name)
    truth = query.obs[key].astype(str).to_numpy()
    rows = []
    print(f"# {name}: reference {ref.n_obs} cells, query {query.n_obs} cells, {ref.n_vars} genes", flush=True)

    # sctransformer from scratch, defaults
    sct.setup_anndata(ref, phenotype_keys=[key])
    model = sct.GeneTransformer(ref, **(model_kwargs or {}))
    start = time.perf_counter()
    model.train(**quiet())
    minutes = (time.perf_counter() - start) / 60
    predicted = model.predict(query)[key].astype(str).to_numpy()
    rows.append(
        {"data": name, "method": "sctransformer (scratch)", "minutes": minutes}
        | score(truth, predicted)
        | calibration(model, query, key)
    )
    print(json.dumps(rows[-1]), flush=True)

    # pre-trained on the other data sets, fine-tuned on the reference
    corpus = pretraining_corpus(name, list(ref.var_names)) if pretrain_epochs > 0 else None
    if corpus is not None:
        sct.setup_anndata(corpus)
        pretrained = sct.GeneTransformer(corpus, **(model_kwargs or {}))
        start = time.perf_counter()
        pretrained.train(max_epochs=pretrain_epochs, calibrate=False, **quiet())
        pretrain_minutes = (time.perf_counter() - start) / 60
        fine = ref.copy()
        sct.setup_anndata(fine, phenotype_keys=[key])
        tuned = sct.GeneTransformer.load_query_data(fine, pretrained, min_gene_overlap=0.3)
        start = time.perf_counter()
        tuned.train(**quiet())
        minutes = (time.perf_counter() - start) / 60
        predicted = tuned.predict(query)[key].astype(str).to_numpy()
        rows.append(
            {
                "data": name,
                "method": "sctransformer (pre-trained + fine-tuned)",
                "minutes": minutes,
                "pretrain_minutes": pretrain_minutes,
                "pretrain_cells": corpus.n_obs,
                "pretrain_genes": corpus.n_vars,
            }
            | score(truth, predicted)
            | calibration(tuned, query, key)
        )
        print(json.dumps(rows[-1]), flush=True)

    # baselines, fitted on the reference only
    both = ad.concat([ref, query], join="inner")
    labels = both.obs[key].astype(str).to_numpy()
    train_idx, test_idx = np.arange(ref.n_obs), np.arange(ref.n_obs, both.n_obs)
    start = time.perf_counter()
    baselines = annotation_baselines(both.X, labels, train_idx, test_idx, seed=0)
    minutes = (time.perf_counter() - start) / 60
    for method, predicted in baselines.items():
        rows.append(
            {"data": name, "method": method, "minutes": minutes / len(baselines)} | score(truth, predicted)
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--datasets", nargs="+", default=["pbmc68k", "paul15", "cellbench", "kang18"])
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--no-pretrain", action="store_true", help="skip the pre-trained + fine-tuned model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--model",
        type=json.loads,
        default={},
        help="GeneTransformer kwargs (JSON) of both sctransformer models",
    )
    parser.add_argument(
        "--swa",
        type=float,
        default=None,
        metavar="LR",
        help="average the weights over the second half of every training run at this learning rate",
    )
    args = parser.parse_args()
    global SWA_LRS
    SWA_LRS = args.swa
    torch.set_num_threads(args.threads)
    sct.settings.seed = args.seed
    if args.no_pretrain:
        args.pretrain_epochs = 0
    rows = []
    for name in args.datasets:
        rows += run_dataset(name, args.pretrain_epochs, args.model)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))

    print(
        f"\nseed {args.seed}, {args.threads} torch threads; macro-F1 [95% bootstrap CI over query cells], accuracy, minutes"
    )
    print("| method | " + " | ".join(args.datasets) + " |")
    print("|---|" + "---|" * len(args.datasets))
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for name in args.datasets:
            r = next((r for r in rows if r["data"] == name and r["method"] == method), None)
            if r is None:
                cells.append("—")
                continue
            lo, hi = r["macro_f1_ci"]
            cells.append(
                f"{r['macro_f1']:.3f} [{lo:.3f}, {hi:.3f}], acc {r['accuracy']:.3f}, {r['minutes']:.1f} min"
            )
        print(f"| {method} | " + " | ".join(cells) + " |")
    print("\nsctransformer calibration on the query: ECE raw -> calibrated (temperature)")
    for r in rows:
        if "ece_raw" in r:
            print(
                f"- {r['data']}, {r['method']}: {r['ece_raw']:.3f} -> {r['ece_calibrated']:.3f} "
                f"(T = {r['temperature']:.2f})"
            )
    for r in rows:
        if "pretrain_minutes" in r:
            print(
                f"- {r['data']}: pre-trained on {r['pretrain_cells']} cells x {r['pretrain_genes']} genes "
                f"in {r['pretrain_minutes']:.1f} min"
            )


if __name__ == "__main__":
    main()
