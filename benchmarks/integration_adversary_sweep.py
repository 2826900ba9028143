"""Adversary weight and schedule on cellbench (what was tried), prepared as in ``benchmarks/integration.py``.

python benchmarks/integration_adversary_sweep.py
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import integration as bench

import sctransformer as sct


def main() -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    warnings.filterwarnings("ignore")
    adata, batch_key, label_key = bench.load("cellbench", 3000, 0)
    adata = bench.prepare(adata, batch_key)
    keys = []
    for weight, schedule in [(0.1, "dann"), (0.3, "dann"), (0.1, "constant")]:
        data = ad.AnnData(
            X=adata.layers["counts"].copy(), obs=adata.obs[[batch_key]].copy(), var=adata.var[[]].copy()
        )
        sct.setup_anndata(data, batch_key=batch_key)
        m = sct.GeneTransformer(data, batch_correction="adversarial", seed=0)
        t = time.time()
        m.train(seed=0, enable_progress_bar=False, adversary_weight=weight, adversary_schedule=schedule)
        key = f"adversarial w={weight} {schedule}"
        adata.obsm[key] = m.get_latent_representation()
        keys.append(key)
        print(key, round((time.time() - t) / 60, 1), "min", flush=True)
    res = sct.metrics.integration(adata, batch_key=batch_key, label_key=label_key, embeddings=keys)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.precision", 3):
        print(res.to_string())


if __name__ == "__main__":
    main()
