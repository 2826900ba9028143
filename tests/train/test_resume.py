"""A training run killed with SIGKILL resumes from its last checkpoint and ends exactly as an uninterrupted run."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import sctransformer as sct

from ..conftest import QUIET

SETUP = textwrap.dedent(
    """
    import sctransformer as sct

    def make_model():
        adata = sct.datasets.synthetic(n_cells=100, n_genes=40, seed=0)
        sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
        return sct.GeneTransformer(
            adata, d_model=16, n_layers=1, n_heads=2, max_length=32, n_bins=5, dropout=0.1, seed=1
        )

    TRAIN = dict(max_epochs=4, batch_size=32, seed=2, enable_progress_bar=False)
    """
)

KILLED_RUN = SETUP + textwrap.dedent(
    """
    import os, signal, sys
    import lightning.pytorch as pl

    class KillAtEpoch(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 3:
                os.kill(os.getpid(), signal.SIGKILL)

    make_model().train(**TRAIN, checkpoint_dir=sys.argv[1], callbacks=[KillAtEpoch()])
    """
)


def _make_model_and_settings():
    namespace: dict = {}
    exec(SETUP, namespace)  # the very same model and settings as the killed subprocess
    return namespace["make_model"], namespace["TRAIN"]


def _train(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(**kwargs, logger=QUIET["logger"])
    return model.module.state_dict()


def test_a_killed_run_resumes_to_exactly_the_uninterrupted_weights(tmp_path):
    make_model, settings = _make_model_and_settings()
    uninterrupted = _train(make_model(), **settings)

    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    checkpoints = tmp_path / "ckpt"
    run = subprocess.run([sys.executable, str(script), str(checkpoints)], capture_output=True, timeout=600)
    assert run.returncode == -9, run.stderr.decode()[-2000:]  # killed by SIGKILL during epoch 4
    assert (checkpoints / "last.ckpt").exists()
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["epoch"] == 2  # written after epoch 3

    resumed = _train(make_model(), **settings, checkpoint_dir=checkpoints, resume=True)
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0)


def test_resume_without_a_checkpoint_starts_fresh(tmp_path, caplog):
    make_model, settings = _make_model_and_settings()
    uninterrupted = _train(make_model(), **settings)
    with caplog.at_level("INFO", logger="sctransformer"):
        fresh = _train(make_model(), **settings, checkpoint_dir=tmp_path / "empty", resume=True)
    assert "starting training from the beginning" in caplog.text
    for key in uninterrupted:
        torch.testing.assert_close(fresh[key], uninterrupted[key], rtol=0, atol=0)


def test_resume_needs_a_checkpoint_directory(adata):
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, d_model=8, n_heads=2, n_layers=1)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        model.train(resume=True)
