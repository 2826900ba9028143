"""Every real data set in ../shared/data goes through setup, a short training and the tools."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest

import sctransformer as sct

from ..conftest import QUIET, TINY, shared_file

CASES = {
    "paul15_mouse_myeloid_progenitors.h5ad": {"phenotype_keys": ["paul15_celltype"]},
    "kang18_ifnb_pbmc_ctrl_stim.h5ad": {
        "phenotype_keys": ["seurat_annotations_partial"],
        "batch_key": "condition",
    },
    "cellbench_tian19_celllines_5batches.h5ad": {"phenotype_keys": ["cell_line"], "batch_key": "batch"},
    "papalexi21_eccite_crispr_lowmoi_299genes.h5ad": {"phenotype_keys": ["perturbation_target"]},
    "pbmc3k_10x_raw.h5ad": {},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_real_data_set_trains_embeds_and_predicts(name):
    full = ad.read_h5ad(shared_file(name))
    rng = np.random.default_rng(0)
    adata = full[np.sort(rng.choice(full.n_obs, size=min(300, full.n_obs), replace=False))].copy()
    sct.setup_anndata(adata, **CASES[name])
    model = sct.GeneTransformer(adata, **{**TINY, "max_length": 64})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, batch_size=64, **QUIET)
    embedding = model.get_latent_representation()
    assert embedding.shape == (adata.n_obs, TINY["d_model"]) and np.isfinite(embedding).all()
    if CASES[name].get("phenotype_keys"):
        key = CASES[name]["phenotype_keys"][0]
        predicted = model.predict()[key]
        assert predicted.notna().all()
        assert set(predicted.cat.categories) == set(adata.obs[key].dropna().astype(str).unique())
