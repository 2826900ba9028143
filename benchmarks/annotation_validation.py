"""One training run scored on validation cells only: how the annotation defaults were chosen.

The data set's reference part (a stratified 80%, seed 0: the same reference as benchmarks/annotation.py,
whose 20% query is never touched here) is split by the model's DataSplitter into 80% training and
20% validation cells; the script trains with the given model / training options and prints, as one
JSON line, the validation macro-F1 and accuracy of the masked cell-type token, logistic regression
fitted on the same training cells, the minutes of training and the train / validation phenotype
accuracy curves (every ~1/8 of the epochs).

Usage: python benchmarks/annotation_validation.py pbmc68k|paul15 '<model kwargs JSON>' '<train kwargs JSON>'
e.g.   python benchmarks/annotation_validation.py paul15 '{"gene_ranking": "expression"}' '{}'
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
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split

import sctransformer as sct
from sctransformer.metrics import log1p_normalise, logistic_regression_baseline

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data", choices=["pbmc68k", "paul15"])
    parser.add_argument("model_kwargs", type=json.loads, help="GeneTransformer options, JSON")
    parser.add_argument("train_kwargs", type=json.loads, help="train() options, JSON")
    args = parser.parse_args()
    torch.set_num_threads(2)
    name, model_kwargs, train_kwargs = args.data, args.model_kwargs, args.train_kwargs
    if name == "pbmc68k":
        adata, key, layer = sct.datasets.pbmc68k(), "cell_type", "counts"
    else:
        adata, key, layer = (
            ad.read_h5ad(DATA / "paul15_mouse_myeloid_progenitors.h5ad"),
            "paul15_celltype",
            None,
        )
    ref_idx, _ = train_test_split(
        np.arange(adata.n_obs), test_size=0.2, random_state=0, stratify=adata.obs[key]
    )
    ref = adata[np.sort(ref_idx)].copy()
    sct.setup_anndata(ref, layer=layer, phenotype_keys=[key])
    model = sct.GeneTransformer(ref, **model_kwargs)
    start = time.perf_counter()
    model.train(train_size=0.8, enable_progress_bar=False, **train_kwargs)
    minutes = (time.perf_counter() - start) / 60
    val, train = np.sort(model.validation_indices), np.sort(model.train_indices)
    truth = ref.obs[key].astype(str).to_numpy()
    predicted = model.predict(ref[val])[key].astype(str).to_numpy()
    labels = sorted(set(truth))
    baseline = logistic_regression_baseline(
        log1p_normalise(ref.layers[layer] if layer else ref.X), truth, train, val
    )
    history = model.history

    def curve(metric: str) -> list[float]:
        values = history[metric].iloc[:, 0].to_numpy()
        return [round(float(v), 2) for v in values[:: max(1, len(values) // 8)]]

    def macro_f1(predictions: np.ndarray) -> float:
        return round(
            float(f1_score(truth[val], predictions, labels=labels, average="macro", zero_division=0)), 3
        )

    print(
        json.dumps(
            {
                "data": name,
                "model": model_kwargs,
                "train": train_kwargs,
                "val_f1": macro_f1(predicted),
                "val_acc": round(float(accuracy_score(truth[val], predicted)), 3),
                "logreg_f1": macro_f1(baseline),
                "min": round(minutes, 2),
                "tr_acc": curve(f"phenotype_{key}_accuracy_train"),
                "va_acc": curve(f"phenotype_{key}_accuracy_validation"),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
