from __future__ import annotations

import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
from scvi.train import _trainrunner

import sctransformer as sct
from sctransformer.train import HistoryTrainRunner

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


def test_a_failed_run_raises_its_error_once_and_prints_nothing(adata, capsys):
    class Fail(pl.Callback):
        def on_train_batch_start(self, *args, **kwargs):
            raise ValueError("stopped by the test")

    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY)
    with pytest.raises(ValueError, match="stopped by the test"):
        _train(model, callbacks=[Fail()])
    assert capsys.readouterr().out == ""  # scvi-tools prints a notice labelled NameError to stdout
    assert "print" not in vars(_trainrunner)  # its module as it was


def test_logger_true_and_a_run_without_a_logger_keep_the_history(adata, tmp_path):
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY)
    _train(model, logger=False)  # nothing recorded in this run
    _train(model, logger=True, default_root_dir=str(tmp_path))  # Lightning's default logger, and the history
    assert len(model.history["loss_train"]) == 2
    assert any(tmp_path.iterdir())  # the default logger wrote its files there


def test_the_default_logger_writes_its_history_only_to_log_save_dir(adata, tmp_path, monkeypatch):
    sct.setup_anndata(adata, layer="counts")
    monkeypatch.chdir(tmp_path)
    model = sct.GeneTransformer(adata, **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, batch_size=32, enable_progress_bar=False)  # logger left to the default
        assert not any(tmp_path.iterdir()) and len(model.history["loss_train"]) == 1
        model.train(
            max_epochs=1, batch_size=32, enable_progress_bar=False, log_save_dir=str(tmp_path / "logs")
        )
    assert list((tmp_path / "logs").rglob("history.pkl"))  # scvi-tools' option, honoured


def test_early_stopping_validates_every_epoch_when_check_val_every_n_epoch_is_none(adata):
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY)
    settings = {"early_stopping": True, "early_stopping_patience": 1, "early_stopping_min_delta": 10.0}
    _train(model, max_epochs=6, check_val_every_n_epoch=None, **settings)
    assert len(model.history["loss_validation"]) == 2  # no epoch improves by 10: it stops after the second


def test_a_later_run_numbers_its_epochs_on_and_keeps_the_spacing_of_its_validation(adata):
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY)
    for _ in range(2):
        _train(model, check_val_every_n_epoch=2, calibrate=False)  # validated after epoch 1 of each run
    assert model.history["loss_train"].index.tolist() == [0, 1, 2, 3]
    assert model.history["loss_validation"].index.tolist() == [1, 3]


def test_a_run_after_a_resumed_one_is_numbered_after_the_resumed_epochs():
    """A resumed run's history holds its own epochs (2 and 3 here); the next run's 0 and 1 follow them."""
    runner = HistoryTrainRunner.__new__(HistoryTrainRunner)  # its history update only
    resumed = {"loss_train": pd.DataFrame({"loss_train": [4.0, 3.0]}, index=pd.Index([2, 3], name="epoch"))}
    runner.model = SimpleNamespace(is_trained_=True, history_=resumed)
    logged = {
        "loss_train": pd.DataFrame({"loss_train": [2.0, 1.0]}, index=pd.Index([0, 1], name="epoch")),
        "loss_validation": pd.DataFrame({"loss_validation": [1.5]}, index=pd.Index([1], name="epoch")),
    }
    runner.trainer = SimpleNamespace(is_global_zero=True, logger=SimpleNamespace(history=logged))
    runner._update_history()
    history = runner.model.history_
    assert history["loss_train"].index.tolist() == [2, 3, 4, 5]
    assert history["loss_train"]["loss_train"].tolist() == [4.0, 3.0, 2.0, 1.0]
    assert history["loss_validation"].index.tolist() == [5]


def test_curves_of_steps_neither_move_the_epochs_nor_are_renumbered_as_epochs():
    """A learning-rate monitor's curve has a value per step: 10 steps do not make the next run's epochs 10 on."""
    runner = HistoryTrainRunner.__new__(HistoryTrainRunner)  # its history update only
    earlier = {
        "loss_train": pd.DataFrame({"loss_train": [4.0, 3.0]}, index=pd.Index([0, 1], name="epoch")),
        "lr-AdamW": pd.DataFrame({"lr-AdamW": np.linspace(0, 1, 10)}, index=pd.Index(range(10), name="step")),
    }
    runner.model = SimpleNamespace(is_trained_=True, history_=earlier)
    logged = {
        "loss_train": pd.DataFrame({"loss_train": [2.0, 1.0]}, index=pd.Index([0, 1], name="epoch")),
        "lr-AdamW": pd.DataFrame({"lr-AdamW": np.linspace(1, 0, 10)}, index=pd.Index(range(10), name="step")),
    }
    runner.trainer = SimpleNamespace(is_global_zero=True, logger=SimpleNamespace(history=logged))
    runner._update_history()
    history = runner.model.history_
    assert history["loss_train"].index.tolist() == [0, 1, 2, 3]
    assert history["lr-AdamW"].index.tolist() == list(range(20))
