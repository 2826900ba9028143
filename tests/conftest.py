from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

# The suite checks CPU results, many bit for bit; on a GPU, training would take it and run in bf16. GPUs stay
# hidden (before torch looks for them) unless SCT_TEST_CUDA=1, which runs the CUDA tests, e.g.
# `SCT_TEST_CUDA=1 pytest tests/module/test_attention.py`.
if os.environ.get("SCT_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

import sctransformer as sct

SHARED_DATA = Path(
    os.environ.get("SCT_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)

#: A model small enough to train in seconds.
TINY = {"d_model": 16, "n_layers": 1, "n_heads": 2, "max_length": 32, "n_bins": 5, "dropout": 0.0}
#: Trainer settings that keep tests quiet and fast.
QUIET = {"enable_progress_bar": False, "logger": None}


def shared_file(name: str) -> Path:
    """Path of a data set in ../shared/data; skips the test where it is absent (a user's clone)."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def fingerprint(adata) -> dict[str, str]:
    """Hash of every part of an AnnData, to check what a call changed."""

    def h(x) -> str:
        if sp.issparse(x):
            x = x.tocsr()
            return hashlib.sha1(x.data.tobytes() + x.indices.tobytes() + x.indptr.tobytes()).hexdigest()
        if hasattr(x, "to_csv"):
            return hashlib.sha1(x.to_csv().encode()).hexdigest()
        return hashlib.sha1(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()

    out = {"X": h(adata.X), "obs": h(adata.obs), "var": h(adata.var)}
    out |= {f"layers/{k}": h(v) for k, v in adata.layers.items()}
    out |= {f"obsm/{k}": h(v) for k, v in adata.obsm.items()}
    out |= {f"varm/{k}": h(v) for k, v in adata.varm.items()}
    out |= {f"varp/{k}": h(v) for k, v in adata.varp.items()}
    out |= {f"obsp/{k}": h(v) for k, v in adata.obsp.items()}
    out["uns"] = hashlib.sha1(repr(sorted(adata.uns.keys())).encode()).hexdigest()
    return out


@pytest.fixture
def adata():
    """Synthetic counts: 120 cells x 60 genes, 3 cell types, 2 batches."""
    return sct.datasets.synthetic(n_cells=120, n_genes=60, n_cell_types=3, n_markers=8, seed=0)


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained for a few epochs on synthetic data with cell-type tokens."""
    data = sct.datasets.synthetic(n_cells=150, n_genes=60, n_cell_types=3, n_markers=8, seed=1)
    sct.setup_anndata(data, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(data, **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=3, batch_size=32, enable_progress_bar=False)
    return model, data


@pytest.fixture(scope="module")
def graphed(trained):
    """The trained model and a copy of its cells with a gene graph (top 5 edges) and log-normalised ``X``."""
    model, data = trained
    adata = data.copy()
    sct.tl.gene_graph(adata, model, top_k=5)
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    return model, adata
