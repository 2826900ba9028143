"""scIB integration metrics (through scib-metrics) and their table plot."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import sctransformer as sct

pytest.importorskip("scib_metrics")


def _cells(n: int = 240, seed: int = 0) -> ad.AnnData:
    """Three labelled states in two batches: one embedding mixes the batches, one keeps them apart."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    batches = rng.integers(0, 2, n)
    mixed = rng.normal(size=(3, 10))[labels] * 3 + rng.normal(size=(n, 10))
    obs = pd.DataFrame(
        {"batch": batches.astype(str), "label": labels.astype(str)}, index=[f"c{i}" for i in range(n)]
    )
    obs.loc[obs.index[:10], "label"] = np.nan  # unlabelled cells are left out
    split = mixed + 6 * batches[:, None]
    return ad.AnnData(obs=obs, obsm={"mixed": mixed, "split": split, "X_pca": split})


def test_a_mixed_embedding_scores_higher_on_batch_correction_and_the_table_plots():
    adata = _cells()
    results = sct.metrics.integration(
        adata, batch_key="batch", label_key="label", embeddings=["mixed", "split"]
    )
    assert list(results.index) == ["mixed", "split"]
    assert {"iLISI", "KBET", "Leiden NMI", "Batch correction", "Bio conservation", "Total"} <= set(
        results.columns
    )
    assert results.loc["mixed", "Batch correction"] > results.loc["split", "Batch correction"] + 0.3
    assert results.loc["mixed", "Total"] > results.loc["split", "Total"]
    expected_total = 0.6 * results["Bio conservation"] + 0.4 * results["Batch correction"]
    np.testing.assert_allclose(results["Total"], expected_total, rtol=1e-6)
    assert results.attrs["metric_type"]["iLISI"] == "Batch correction"
    ax = sct.pl.integration(results, show=False)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["split", "mixed"]  # best total on top
    with pytest.raises(KeyError, match="X_umap"):
        sct.metrics.integration(adata, batch_key="batch", label_key="label", embeddings=["X_umap"])
    single = adata.copy()
    single.obs["batch"] = "one"
    with pytest.raises(ValueError, match="single batch"):
        sct.metrics.integration(single, batch_key="batch", label_key="label", embeddings=["mixed"])
    one_labelled = adata.copy()  # two batches, but only one has labelled cells
    one_labelled.obs.loc[one_labelled.obs["batch"] == "1", "label"] = np.nan
    with pytest.raises(ValueError, match="single batch among the cells with a label"):
        sct.metrics.integration(one_labelled, batch_key="batch", label_key="label", embeddings=["mixed"])


def test_cells_without_a_batch_are_left_out_and_pcr_can_be_left_out():
    adata = _cells()
    adata.obs.loc[adata.obs.index[10:40], "batch"] = np.nan
    kept = adata[adata.obs["batch"].notna()].copy()
    without_pcr = sct.metrics.integration(
        adata, batch_key="batch", label_key="label", embeddings=["mixed"], pre_integrated=None, kbet=False
    )
    assert "PCR comparison" not in without_pcr.columns and np.isfinite(without_pcr.to_numpy()).all()
    expected = sct.metrics.integration(  # a single key as a string: not split into characters
        kept, batch_key="batch", label_key="label", embeddings="mixed", pre_integrated=None, kbet=False
    )
    pd.testing.assert_frame_equal(without_pcr, expected)  # not a batch called "nan"


def test_a_single_label_is_refused_before_scoring(monkeypatch):
    import scib_metrics.benchmark

    def fail(*args, **kwargs):
        raise AssertionError("scored a single label")

    monkeypatch.setattr(scib_metrics.benchmark.Benchmarker, "benchmark", fail)
    adata = _cells()
    adata.obs["label"] = "T"
    with pytest.raises(ValueError, match="single label among the cells with a label and a batch"):
        sct.metrics.integration(adata, batch_key="batch", label_key="label", embeddings=["mixed"])
    one_with_batch = _cells()  # two labels, but only one among the cells with a batch
    one_with_batch.obs.loc[one_with_batch.obs["label"] != "0", "batch"] = np.nan
    with pytest.raises(ValueError, match="single label among the cells with a label and a batch"):
        sct.metrics.integration(one_with_batch, batch_key="batch", label_key="label", embeddings="mixed")


def test_keys_that_cannot_be_scored_are_refused_before_scoring(monkeypatch):
    import scib_metrics.benchmark

    def fail(*args, **kwargs):
        raise AssertionError("scored")

    monkeypatch.setattr(scib_metrics.benchmark.Benchmarker, "benchmark", fail)
    adata = _cells()
    with pytest.raises(ValueError, match="batch_key and label_key are both 'batch'"):
        sct.metrics.integration(adata, batch_key="batch", label_key="batch", embeddings=["mixed"])
    with pytest.raises(ValueError, match=r"embeddings names \['mixed'\] more than once"):
        sct.metrics.integration(adata, batch_key="batch", label_key="label", embeddings=["mixed", "mixed"])
    del adata.obsm["X_pca"]
    with pytest.raises(KeyError, match=r"pre_integrated 'X_pca'.*sc.pp.pca.*pre_integrated=None"):
        sct.metrics.integration(adata, batch_key="batch", label_key="label", embeddings=["mixed"])


def test_a_sparse_embedding_is_scored_as_its_dense_values():
    import scipy.sparse as sp

    adata = _cells()
    options = {"batch_key": "batch", "label_key": "label", "kbet": False}
    dense = sct.metrics.integration(adata, embeddings="mixed", pre_integrated="X_pca", **options)
    adata.obsm["mixed"] = sp.csr_matrix(adata.obsm["mixed"])
    adata.obsm["X_pca"] = sp.csr_array(adata.obsm["X_pca"])
    pd.testing.assert_frame_equal(
        sct.metrics.integration(adata, embeddings="mixed", pre_integrated="X_pca", **options), dense
    )
