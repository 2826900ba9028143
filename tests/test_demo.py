"""The README's demo, end to end (short training)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_writes_results_plots_and_a_reloadable_model(tmp_path):
    out = tmp_path / "demo_out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--out", str(out), "--max-epochs", "3"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "macro-F1" in result.stdout and "logistic regression" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_test_cells"] == 140
    assert 0 <= summary["sctransformer_macro_f1"] <= 1 and 0 <= summary["logreg_macro_f1"] <= 1
    assert summary["reload_gives_same_embedding"] is True
    adata = ad.read_h5ad(out / "pbmc68k_sct.h5ad")
    assert adata.obsm["X_sct"].shape[0] == 700
    assert {"sct_cell_type", "sct_cell_type_confidence"} <= set(adata.obs)
    assert 0 <= summary["test_ece_calibrated"] <= 1
    for png in ("embedding_umap.png", "training_history.png", "confusion_matrix.png", "calibration.png"):
        assert (out / png).stat().st_size > 10_000
    assert (out / "pbmc_model" / "model.safetensors").exists()
