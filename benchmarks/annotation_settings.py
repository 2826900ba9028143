"""How model settings change held-out cell-type annotation on pbmc68k, one run, one table.

Each row trains a GeneTransformer from scratch on the demo's split (70% train / 10% validation /
20% test cells, scvi-tools' DataSplitter) with one setting changed from the defaults, once per seed
(the seed sets the split, the initialisation and the masks), and reports the validation accuracy of
the masked cell-type token (what a user could select on) next to the test macro-F1 / accuracy
(reported, never used to pick defaults) and the kNN accuracy of the cell embeddings. Logistic
regression on log1p-normalised counts of all genes and kNN on their 50 principal components,
fitted on the same training cells of the same split, are the references.

Usage: python benchmarks/annotation_settings.py [--threads 2] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.metrics import accuracy_score, f1_score

import sctransformer as sct
from sctransformer.metrics import knn_probe_accuracy, log1p_normalise, logistic_regression_baseline

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

SETTINGS = [
    ("defaults", {}, {}),
    ("dropout=0", {"dropout": 0.0}, {}),
    ("value_encoding='continuous'", {"value_encoding": "continuous"}, {}),
    ("binning='fixed'", {"binning": "fixed"}, {}),
    ("phenotype_mask_prob=0.8", {}, {"phenotype_mask_prob": 0.8}),
]


def mean_sd(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, list[tuple[float, ...]]] = {name: [] for name, _, _ in SETTINGS}
    baselines = []
    for seed in args.seeds:
        for name, model_kwargs, train_kwargs in SETTINGS:
            adata = sct.datasets.pbmc68k()
            sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
            model = sct.GeneTransformer(adata, seed=seed, **model_kwargs)
            start = time.perf_counter()
            model.train(
                train_size=0.7, validation_size=0.1, seed=seed, enable_progress_bar=False, **train_kwargs
            )
            minutes = (time.perf_counter() - start) / 60
            train_idx, test_idx = np.sort(model.train_indices), np.sort(model.test_indices)
            truth = adata.obs["cell_type"].astype(str).to_numpy()
            labels = sorted(set(truth))
            predicted = model.predict(adata)["cell_type"].astype(str).to_numpy()
            validation = float(model.history["phenotype_cell_type_accuracy_validation"].iloc[-1, 0])
            f1 = f1_score(
                truth[test_idx], predicted[test_idx], labels=labels, average="macro", zero_division=0
            )
            acc = accuracy_score(truth[test_idx], predicted[test_idx])
            knn_cls = knn_probe_accuracy(model.get_latent_representation(adata), truth, train_idx, test_idx)
            knn_mean = knn_probe_accuracy(
                model.get_latent_representation(adata, pooling="mean"), truth, train_idx, test_idx
            )
            results[name].append((validation, f1, acc, knn_cls, knn_mean, minutes))
            print(
                json.dumps({"seed": seed, "setting": name, "validation_accuracy": round(validation, 3)}),
                flush=True,
            )
        x = log1p_normalise(adata.layers["counts"])
        baseline = logistic_regression_baseline(x, truth, train_idx, test_idx)
        pca = PCA(n_components=50, random_state=0).fit_transform(x.toarray())
        baselines.append(
            (
                f1_score(truth[test_idx], baseline, labels=labels, average="macro", zero_division=0),
                accuracy_score(truth[test_idx], baseline),
                knn_probe_accuracy(pca, truth, train_idx, test_idx),
            )
        )

    print(
        f"\npbmc68k, 490 train / 140 test cells per seed, seeds {args.seeds}, {args.threads} torch threads; mean ± sd"
    )
    header = [
        "setting",
        "val. acc",
        "test macro-F1",
        "test acc",
        "kNN acc (CLS)",
        "kNN acc (mean)",
        "minutes",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, runs in results.items():
        cols = [mean_sd([r[i] for r in runs]) for i in range(5)]
        print(f"| {name} | " + " | ".join(cols) + f" | {np.mean([r[5] for r in runs]):.1f} |")
    f1s, accs, knns = zip(*baselines, strict=True)
    print(f"| logistic regression, all genes | | {mean_sd(f1s)} | {mean_sd(accs)} | | | |")
    print(f"| kNN on 50 PCs of log1p counts | | | | {mean_sd(knns)} | | |")


if __name__ == "__main__":
    main()
