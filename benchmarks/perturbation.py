"""Perturbation, response prediction and generation, each next to the simple baselines.

1. papalexi21 (ECCITE-seq CRISPR, 299 genes): a model pre-trained on every cell (no labels); the
   in-silico deletion of each knock-out target that is among the genes, run on non-targeting
   cells, gives a predicted mean change of every other gene; it is correlated with the observed
   change (knock-out cells minus non-targeting cells), next to "no change" and "the mean observed
   change of the other knock-outs". The predicted change is averaged over all sampled control
   cells (zero where the gene is not expressed), as the observed one is over all cells.
2. kang18 (IFN-beta stimulation): cell types transferred from the 832 labelled cells (kNN on PCA)
   to all cells; every stimulated cell of the held-out type is left out of training; the model
   (phenotype tokens ``condition`` and ``cell_type``) predicts that type's stimulated expression
   from its control cells by swapping ``condition``; the predicted change is correlated with the
   observed change (top 50 DE genes and all genes), next to the additive baseline (the average
   stim - ctrl change of the other types) and scGen-style latent arithmetic with the model's
   embedding (the mean stim - ctrl shift of the other types' embeddings, taken with phenotype
   tokens masked and nothing held out, added to the embedding where it enters the query head,
   where the cells' own tokens are fed and a quarter of the genes held out: a mismatch of
   settings this simple version accepts), and the refined swap (``predict_response(...,
   refine_rounds=R)`` for each R of ``--refine-rounds``: each prediction fed back as the cells'
   input, for the swapped and the own-token chains alike; on a seeded sample of ``--refine-cells``
   control cells). The
   top 50 DE genes are those with the largest absolute Wilcoxon scores, held-out stim vs ctrl
   cells of that type.
3. generation (the kang18 model): cells generated from ``cell_type`` + ``condition`` tokens vs
   real cells of that type and condition: a classifier two-sample test (AUROC of a logistic
   regression on 20 principal components, 5-fold; 0.5 = indistinguishable) and the correlation of
   per-gene means and dispersions, all against one half of the real cells; next to the other half
   (the noise floor) and "independent genes" (the other half with each gene's values shuffled
   across cells: right marginals, no co-expression).

Usage: ``python benchmarks/perturbation.py [--quick] [--parts kang] [--refine-rounds 1 2 3] [--refine-cells 640]
[--held-out-type "CD14 Mono"]``;
prints one table per part.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from scipy.stats import pearsonr
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

import sctransformer as sct

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HELD_OUT_TYPE = "CD14 Mono"


def log1p_normalised(x) -> np.ndarray:
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    return np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    if np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(pearsonr(a, b)[0])


# ---------------------------------------------------------------------------------------- papalexi
def papalexi(epochs: int, n_cells: int, seed: int) -> pd.DataFrame:
    adata = ad.read_h5ad(DATA / "papalexi21_eccite_crispr_lowmoi_299genes.h5ad")
    adata.layers["counts"] = adata.X.copy()
    sct.setup_anndata(adata, layer="counts", batch_key="bio_rep")
    model = sct.GeneTransformer(adata, expression_queries=32, seed=seed)
    start = time.time()
    model.train(max_epochs=epochs, lr=3e-3, enable_progress_bar=False)
    print(f"papalexi21: trained {epochs} epochs on {adata.n_obs} cells in {time.time() - start:.0f} s")

    values = log1p_normalised(adata.layers["counts"])
    target = adata.obs["perturbation_target"].astype(str).to_numpy()
    control = target == "non-targeting"
    observed = {
        t: values[target == t].mean(0) - values[control].mean(0)
        for t in np.unique(target)
        if t != "non-targeting"
    }
    targets = [t for t in observed if t in adata.var_names]
    rng = np.random.default_rng(seed)
    cells = rng.choice(np.flatnonzero(control), size=min(n_cells, int(control.sum())), replace=False)
    subset = adata[np.sort(cells)].copy()
    start = time.time()
    model.perturb(subset, targets, predict_expression=False)
    embed_seconds = time.time() - start
    start = time.time()
    result = model.perturb(subset, targets)
    full_seconds = time.time() - start
    n_perturbed = int(result.summary["n_cells"].sum())

    rows = []
    genes = np.asarray(adata.var_names)
    deleted_in = result.summary.set_index("perturbed")["n_cells"]
    for t in targets:
        if t not in deleted_in.index:  # expressed in none of the sampled control cells
            continue
        others = genes != t
        truth = observed[t][others]
        # deletion changes nothing in cells without the gene: the mean change over all sampled cells
        share = deleted_in[t] / len(cells)
        predicted = share * result.expression_change.loc[(t, "all")].reindex(genes).to_numpy()[others]
        mean_other = np.mean([observed[o] for o in observed if o != t], axis=0)[others]
        rows.append(
            {
                "target": t,
                "ko_cells": int((target == t).sum()),
                "deleted_in": int(deleted_in[t]),
                "pearson_model": pearson(predicted, truth),
                "pearson_mean_ko": pearson(mean_other, truth),
                "mse_model": float(np.mean((predicted - truth) ** 2)),
                "mse_no_change": float(np.mean(truth**2)),
                "mse_mean_ko": float(np.mean((mean_other - truth) ** 2)),
            }
        )
    table = pd.DataFrame(rows)
    mean = table.drop(columns=["target"]).mean(numeric_only=True)
    table.loc[len(table)] = {"target": "mean", **mean.to_dict()}
    print(
        f"deletion throughput on {len(cells)} non-targeting cells: {n_perturbed} cell x gene perturbations; "
        f"embedding only {n_perturbed / embed_seconds:.0f} per s, with every gene's expression "
        f"({model.module.gene_embedding.num_embeddings} genes, 4 folds) {n_perturbed / full_seconds:.1f} per s"
    )
    return table


# ---------------------------------------------------------------------------------------- kang
def hvg_mask(adata: ad.AnnData, n_hvg: int) -> np.ndarray:
    normalised = sc.pp.log1p(sc.pp.normalize_total(adata, target_sum=1e4, copy=True), copy=True)
    sc.pp.highly_variable_genes(normalised, n_top_genes=n_hvg, batch_key="condition")
    return normalised.var["highly_variable"].to_numpy()


def kang_data(n_hvg: int, seed: int) -> ad.AnnData:
    """Cell types for every cell; genes: HVGs of the cells the model is trained on."""
    adata = ad.read_h5ad(DATA / "kang18_ifnb_pbmc_ctrl_stim.h5ad")
    adata.layers["counts"] = adata.X.copy()
    # transfer the 832 labels to every cell (this only decides which cells are held out): kNN on
    # 50 principal components of HVGs of all cells
    pcs = PCA(50, random_state=seed).fit_transform(
        log1p_normalised(adata.layers["counts"][:, hvg_mask(adata, n_hvg)])
    )
    labels = adata.obs["seurat_annotations_partial"]
    known = labels.notna().to_numpy()
    knn = KNeighborsClassifier(15).fit(pcs[known], labels[known].astype(str))
    adata.obs["cell_type"] = pd.Categorical(np.where(known, labels.astype(str), knn.predict(pcs)))
    adata.obs["condition"] = adata.obs["condition"].astype(str).astype("category")
    held = ((adata.obs["cell_type"] == HELD_OUT_TYPE) & (adata.obs["condition"] == "stim")).to_numpy()
    # the model's genes are chosen without the held-out cells
    return adata[:, hvg_mask(adata[~held], n_hvg)].copy()


def kang_response(
    adata: ad.AnnData, epochs: int, seed: int, refine_rounds: Sequence[int] = (), refine_cells: int = 640
) -> tuple[pd.DataFrame, sct.GeneTransformer, ad.AnnData]:
    held = ((adata.obs["cell_type"] == HELD_OUT_TYPE) & (adata.obs["condition"] == "stim")).to_numpy()
    train = adata[~held].copy()
    sct.setup_anndata(train, layer="counts", phenotype_keys=["condition", "cell_type"])
    model = sct.GeneTransformer(train, expression_queries=32, seed=seed)
    start = time.time()
    model.train(max_epochs=epochs, lr=3e-3, enable_progress_bar=False)
    print(
        f"kang18: {adata.n_vars} HVGs; {held.sum()} stimulated {HELD_OUT_TYPE} cells held out; trained {epochs} "
        f"epochs on {train.n_obs} cells in {time.time() - start:.0f} s"
    )
    values = log1p_normalised(adata.layers["counts"])
    kind = adata.obs["cell_type"].astype(str).to_numpy()
    condition = adata.obs["condition"].astype(str).to_numpy()
    ctrl_t = (kind == HELD_OUT_TYPE) & (condition == "ctrl")
    observed = values[held].mean(0) - values[ctrl_t].mean(0)
    others = [t for t in np.unique(kind) if t != HELD_OUT_TYPE]
    shifts = [
        values[(kind == t) & (condition == "stim")].mean(0)
        - values[(kind == t) & (condition == "ctrl")].mean(0)
        for t in others
    ]
    additive = np.mean(shifts, axis=0)

    controls = adata[ctrl_t].copy()
    response = model.predict_response(controls, {"condition": "stim"})
    swap = np.asarray(response.X).mean(0) - response.layers["sct_baseline"].mean(0)
    # the same swap with every gene predicted from the phenotype tokens alone (no gene in the input)
    tokens_only = model.predict_response(controls, {"condition": "stim"}, n_folds=1)
    swap_tokens = np.asarray(tokens_only.X).mean(0) - tokens_only.layers["sct_baseline"].mean(0)
    # scGen-style: the mean stim - ctrl embedding shift of the other types, added to the embedding
    z = model.get_latent_representation(train)
    train_kind = train.obs["cell_type"].astype(str).to_numpy()
    train_condition = train.obs["condition"].astype(str).to_numpy()
    delta = np.mean(
        [
            z[(train_kind == t) & (train_condition == "stim")].mean(0)
            - z[(train_kind == t) & (train_condition == "ctrl")].mean(0)
            for t in others
        ],
        axis=0,
    )
    shifted = model.get_normalized_expression(controls, cell_shift=delta)
    latent = shifted.mean(0) - response.layers["sct_baseline"].mean(0)
    refined = {}
    rng = np.random.default_rng(seed)  # a seeded sample of the control cells (each round costs 2 x 4 passes)
    sample = np.sort(rng.choice(controls.n_obs, min(refine_cells, controls.n_obs), replace=False))
    for rounds in (r for r in refine_rounds if r > 0):
        start = time.time()
        chain = model.predict_response(controls[sample].copy(), {"condition": "stim"}, refine_rounds=rounds)
        refined[f"sctransformer swap, refined {rounds} rounds ({len(sample)} cells)"] = np.asarray(
            chain.X
        ).mean(0) - chain.layers["sct_baseline"].mean(0)
        print(f"refined swap: {len(sample)} control cells, {rounds} rounds in {time.time() - start:.0f} s")

    # top 50 DE genes of the held-out type, stim vs ctrl: largest absolute Wilcoxon scores
    both = adata[held | ctrl_t].copy()
    both.X = values[held | ctrl_t]
    sc.tl.rank_genes_groups(
        both, "condition", groups=["stim"], reference="ctrl", method="wilcoxon", n_genes=both.n_vars
    )
    ranked = pd.DataFrame(
        {
            "names": both.uns["rank_genes_groups"]["names"]["stim"],
            "scores": both.uns["rank_genes_groups"]["scores"]["stim"],
        }
    )
    top = ranked.reindex(ranked["scores"].abs().sort_values(ascending=False).index)["names"][:50]
    top_idx = adata.var_names.get_indexer(top)
    rows = []
    methods = [
        ("sctransformer swap (4 folds)", swap),
        ("sctransformer swap (tokens only)", swap_tokens),
        ("latent arithmetic", latent),
        *refined.items(),
        ("additive baseline", additive),
    ]
    for name, predicted in methods:
        rows.append(
            {
                "method": name,
                "pearson_top50_de": pearson(predicted[top_idx], observed[top_idx]),
                "pearson_all_genes": pearson(predicted, observed),
                "mse_all_genes": float(np.mean((predicted - observed) ** 2)),
            }
        )
    rows.append(
        {
            "method": "no change",
            "pearson_top50_de": float("nan"),
            "pearson_all_genes": float("nan"),
            "mse_all_genes": float(np.mean(observed**2)),
        }
    )
    return pd.DataFrame(rows), model, train


# ---------------------------------------------------------------------------------------- generation
def c2st(real: np.ndarray, other: np.ndarray, seed: int) -> float:
    x = np.vstack([real, other])
    y = np.r_[np.zeros(len(real)), np.ones(len(other))]
    pcs = PCA(20, random_state=seed).fit_transform(x)
    classifier = LogisticRegression(max_iter=2000)
    return float(cross_val_score(classifier, pcs, y, cv=5, scoring="roc_auc").mean())


def moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(0)
    dispersion = np.divide(x.var(0), mean, out=np.zeros_like(mean), where=mean > 0)
    return mean, dispersion


def generation(model: sct.GeneTransformer, train: ad.AnnData, n_cells: int, seed: int) -> pd.DataFrame:
    values = log1p_normalised(train.layers["counts"])
    kind = train.obs["cell_type"].astype(str).to_numpy()
    condition = train.obs["condition"].astype(str).to_numpy()
    rng = np.random.default_rng(seed)
    rows = []
    for cell_type in ["CD14 Mono", "CD4 Naive T", "B"]:
        for cond in ["ctrl", "stim"]:
            pool = np.flatnonzero((kind == cell_type) & (condition == cond))
            if len(pool) < 2 * n_cells:
                continue
            chosen = rng.choice(pool, 2 * n_cells, replace=False)
            real, held_half = values[chosen[:n_cells]], values[chosen[n_cells:]]
            start = time.time()
            generated = model.generate({"cell_type": cell_type, "condition": cond}, n_cells, seed=seed)
            seconds = time.time() - start
            fake = generated[:, train.var_names].X.toarray()
            # the other half of the real cells, each gene shuffled: right marginals, no co-expression
            independent = np.column_stack([rng.permutation(held_half[:, j]) for j in range(real.shape[1])])
            m_real, d_real = moments(real)
            for name, x in [
                ("sctransformer", fake),
                ("independent genes", independent),
                ("real (other half)", held_half),
            ]:
                m, d = moments(x)
                rows.append(
                    {
                        "cell_type": cell_type,
                        "condition": cond,
                        "generator": name,
                        "c2st_auroc": c2st(real, x, seed),
                        "mean_pearson": pearson(m, m_real),
                        "dispersion_pearson": pearson(d, d_real),
                        "seconds": seconds if name == "sctransformer" else float("nan"),
                    }
                )
    return pd.DataFrame(rows)


def main() -> None:
    global HELD_OUT_TYPE
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 epoch each, fewer cells (a smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default="papalexi,kang", help="comma-separated: papalexi, kang")
    parser.add_argument(
        "--refine-rounds",
        type=int,
        nargs="+",
        default=[1],
        help="rounds of the refined swap, one row each (0: leave it out)",
    )
    parser.add_argument("--refine-cells", type=int, default=640, help="control cells of the refined swap")
    parser.add_argument(
        "--held-out-type", default=HELD_OUT_TYPE, help="kang18 cell type whose stimulated cells are held out"
    )
    args = parser.parse_args()
    HELD_OUT_TYPE = args.held_out_type
    sct.settings.seed = args.seed
    pd.set_option("display.width", 200, "display.max_columns", 20, "display.precision", 3)
    parts = args.parts.split(",")
    if "papalexi" in parts:
        table = papalexi(1 if args.quick else 8, 100 if args.quick else 1000, args.seed)
        print(
            "\nIn-silico deletion vs observed knock-out effect (papalexi21, Pearson over the other 298 genes)"
        )
        print(table.to_string(index=False))
    if "kang" in parts:
        adata = kang_data(500 if args.quick else 2000, args.seed)
        table, model, train = kang_response(
            adata,
            1 if args.quick else 15,
            args.seed,
            refine_rounds=[1] if args.quick else args.refine_rounds,
            refine_cells=40 if args.quick else args.refine_cells,
        )
        print(f"\nHeld-out stimulation of {HELD_OUT_TYPE} (kang18): predicted vs observed stim - ctrl change")
        print(table.to_string(index=False))
        table = generation(model, train, 30 if args.quick else 200, args.seed)
        print(
            "\nGeneration from cell_type + condition tokens (kang18 model), vs real cells of that type and condition"
        )
        print(table.to_string(index=False))


if __name__ == "__main__":
    main()
