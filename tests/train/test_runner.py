from __future__ import annotations

import warnings

import numpy as np

import sctransformer as sct

from ..conftest import QUIET, TINY


def _train(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(**{"max_epochs": 2, "batch_size": 32, **QUIET, **kwargs})


def test_history_gains_curves_first_logged_in_a_later_run(adata, tmp_path):
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, **TINY)
    _train(model, train_size=1.0)  # no validation cells: no validation curves
    assert "loss_validation" not in model.history
    _train(model, train_size=0.8)
    assert model.history["loss_train"].index.tolist() == [0, 1, 2, 3]
    assert model.history["loss_validation"].index.tolist() == [2, 3]  # indexed by epochs trained
    assert np.isfinite(model.history["loss_validation"].to_numpy()).all()


def test_logger_true_and_a_run_without_a_logger_keep_the_history(adata, tmp_path):
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY)
    _train(model, logger=False)  # nothing recorded in this run
    _train(model, logger=True, default_root_dir=str(tmp_path))  # Lightning's default logger, and the history
    assert len(model.history["loss_train"]) == 2
    assert any(tmp_path.iterdir())  # the default logger wrote its files there
