"""A training run killed with SIGKILL resumes from its last checkpoint and ends exactly as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

import sctransformer as sct

from ..conftest import QUIET, TINY

SETUP = textwrap.dedent(
    """
    import sctransformer as sct

    def make_model(kind, workdir):
        adata = sct.datasets.synthetic(n_cells=100, n_genes=40, seed=0)
        hyperparameters = dict(d_model=16, n_layers=1, n_heads=2, max_length=32, n_bins=5, dropout=0.1, seed=1)
        if kind == "anndata":
            sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
            return sct.GeneTransformer(adata, **hyperparameters)
        paths = []
        for i, (start, stop) in enumerate([(0, 45), (45, 100)]):
            paths.append(f"{workdir}/shard_{i}.h5ad")
            adata[start:stop].copy().write_h5ad(paths[-1])
        data = sct.data.ShardedAnnData(paths, layer="counts", phenotype_keys=["cell_type"])
        return sct.GeneTransformer.from_shards(data, **hyperparameters)

    TRAIN = dict(max_epochs=4, batch_size=32, seed=2, enable_progress_bar=False)

    def strategy(name):
        # Trainer options of a named setting (a fresh strategy object per run)
        import lightning.pytorch as pl

        return {"strategy": pl.strategies.SingleDeviceStrategy("cpu")} if name == "single" else {}
    """
)

# killed at the start of a step: 3 minibatches per epoch, so step 5 is the middle of epoch 2 and
# step 9 the start of epoch 4
KILLED_RUN = SETUP + textwrap.dedent(
    """
    import os, signal, sys
    import lightning.pytorch as pl

    kind, workdir, checkpoints, kill_at, every, setting = sys.argv[1:7]

    class KillAtStep(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)

    make_model(kind, workdir).train(
        **TRAIN,
        **strategy(setting),
        checkpoint_dir=checkpoints,
        checkpoint_every_n_steps=int(every) if every != "none" else None,
        callbacks=[KillAtStep()],
    )
    """
)


def _make_model_and_settings():
    namespace: dict = {}
    exec(SETUP, namespace)  # the very same model and settings as the killed subprocess
    return namespace["make_model"], namespace["TRAIN"], namespace["strategy"]


def _train(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(**kwargs, logger=QUIET["logger"])
    return model.module.state_dict()


@pytest.mark.parametrize(
    ("kind", "kill_at", "every", "checkpoint_step", "setting"),
    [
        ("anndata", 9, "none", 9, "default"),  # after 3 whole epochs, from the epoch-end checkpoint
        ("anndata", 5, "2", 4, "default"),  # midway through epoch 2: one of its 3 minibatches done
        ("shards", 5, "2", 4, "default"),
        ("anndata", 5, "2", 4, "single"),  # an explicit strategy object (the path DDP takes)
    ],
)
def test_a_killed_run_resumes_to_exactly_the_uninterrupted_weights(
    tmp_path, kind, kill_at, every, checkpoint_step, setting
):
    make_model, settings, strategy = _make_model_and_settings()
    model = make_model(kind, tmp_path)
    uninterrupted = _train(model, **settings, **strategy(setting))
    curves = model.history

    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    checkpoints = tmp_path / "ckpt"
    run = subprocess.run(
        [sys.executable, str(script), kind, str(tmp_path), str(checkpoints), str(kill_at), every, setting],
        capture_output=True,
        timeout=600,
    )
    assert run.returncode == -9, run.stderr.decode()[-2000:]  # killed by SIGKILL
    checkpoint = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == checkpoint_step

    model = make_model(kind, tmp_path)
    resumed = _train(model, **settings, **strategy(setting), checkpoint_dir=checkpoints, resume=True)
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0)
    # the resumed epochs' means, the one resumed midway included (its sums are in the checkpoint)
    for name, curve in model.history.items():
        expected = curves[name].iloc[-len(curve) :].to_numpy()
        np.testing.assert_allclose(curve.to_numpy(), expected, rtol=1e-6, err_msg=name)


def test_a_mid_epoch_resume_without_the_data_position_would_differ(tmp_path):
    """The check above can fail: resuming midway but replaying the epoch from its start changes the weights."""
    make_model, settings, _ = _make_model_and_settings()
    uninterrupted = _train(make_model("anndata", tmp_path), **settings)
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    checkpoints = tmp_path / "ckpt"
    subprocess.run(
        [sys.executable, str(script), "anndata", str(tmp_path), str(checkpoints), "5", "2", "default"],
        capture_output=True,
        timeout=600,
    )
    checkpoint = torch.load(checkpoints / "last.ckpt", weights_only=False)
    del checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # forget the data position
    torch.save(checkpoint, checkpoints / "last.ckpt")
    resumed = _train(make_model("anndata", tmp_path), **settings, checkpoint_dir=checkpoints, resume=True)
    assert any(not torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


class _Stop(Exception):
    """Ends a run in this process; its last checkpoint stays, as after a kill."""


class _StopAtStep(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise _Stop


@pytest.mark.parametrize(
    ("kind", "every", "checkpoint_step", "changes"),
    [
        # midway through epoch 2 (1 of 3 minibatches done): the loader's own state is checked
        (
            "anndata",
            2,
            4,
            [
                ({"batch_size": 16}, "batch_size: 32 in the checkpoint, 16 now"),
                ({"seed": 3}, "seed: 2 in the checkpoint, 3 now"),
                ({"n_cells": 120}, "number of training cells: 90 in the checkpoint, 108 now"),
            ],
        ),
        # at the end of the first epoch, whose loader state Lightning does not hand back to the loader
        (
            "shards",
            None,
            3,
            [
                ({"batch_size": 16}, "batch_size: 32 in the checkpoint, 16 now"),
                ({"datasplitter_kwargs": {"block_size": 4}}, "checksum of which cells"),
            ],
        ),
    ],
)
def test_resuming_with_other_minibatches_is_refused_and_the_checkpoint_still_resumes(
    tmp_path, kind, every, checkpoint_step, changes
):
    make_model, settings, _ = _make_model_and_settings()
    checkpoints = tmp_path / "ckpt"
    with pytest.raises(_Stop):
        _train(
            make_model(kind, tmp_path),
            **settings,
            checkpoint_dir=checkpoints,
            checkpoint_every_n_steps=every,
            callbacks=[_StopAtStep(5)],
        )
    written = (checkpoints / "last.ckpt").read_bytes()
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == checkpoint_step
    for change, named in changes:
        change = dict(change)
        if "n_cells" in change:  # other data: more cells, the same model
            adata = sct.datasets.synthetic(n_cells=change.pop("n_cells"), n_genes=40, seed=0)
            sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
            model = sct.GeneTransformer(
                adata, d_model=16, n_layers=1, n_heads=2, max_length=32, n_bins=5, dropout=0.1, seed=1
            )
        else:
            model = make_model(kind, tmp_path)
        with pytest.raises(ValueError, match="cannot resume from this checkpoint") as error:
            _train(model, **{**settings, **change}, checkpoint_dir=checkpoints, resume=True)
        assert named in str(error.value)
        assert "same arguments" in str(error.value) and "resume=False" in str(error.value)
        assert model.module.training is False  # train() cleaned up
        assert (checkpoints / "last.ckpt").read_bytes() == written  # nothing written over it
    # resumed with the same arguments, the checkpoint ends as the uninterrupted run
    resumed = _train(make_model(kind, tmp_path), **settings, checkpoint_dir=checkpoints, resume=True)
    uninterrupted = _train(make_model(kind, tmp_path), **settings)
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0)


def _stopped_midway(tmp_path):
    """A run stopped at step 5 (midway through epoch 2) with checkpoints every 2 steps: its model
    factory, settings, checkpoint directory and the bytes of its last checkpoint."""
    make_model, settings, _ = _make_model_and_settings()
    checkpoints = tmp_path / "ckpt"
    with pytest.raises(_Stop):
        _train(
            make_model("anndata", tmp_path),
            **settings,
            checkpoint_dir=checkpoints,
            checkpoint_every_n_steps=2,
            callbacks=[_StopAtStep(5)],
        )
    return make_model, settings, checkpoints, (checkpoints / "last.ckpt").read_bytes()


def test_resuming_with_other_optimisation_settings_is_refused_and_an_older_checkpoint_still_resumes(tmp_path):
    """The checkpoint holds AdamW's learning rates and weight decay and the schedule's step count.

    A run resumed with others would take the checkpoint's and record its own, or mix the two.
    """
    make_model, settings, checkpoints, written = _stopped_midway(tmp_path)
    for change, named in [
        ({"lr": 0.01}, "lr: 0.001 in the checkpoint, 0.01 now"),
        ({"weight_decay": 0.5}, "weight_decay: 0.01 in the checkpoint, 0.5 now"),
        ({"warmup_fraction": 0.5}, "warmup_fraction: 0.1 in the checkpoint, 0.5 now"),
        ({"max_epochs": 5}, "max_epochs (-1: as many as max_steps take): 4 in the checkpoint, 5 now"),
        ({"freeze": "embeddings"}, "number of trained parameters (set by freeze)"),
        # the default 1.0 (every minibatch) equals the int 1 (one minibatch) in Python, not to Lightning
        ({"limit_train_batches": 1}, "limit_train_batches as a share (a float: 1.0 is every minibatch"),
    ]:
        model = make_model("anndata", tmp_path)
        with pytest.raises(ValueError, match="cannot resume from this checkpoint") as error:
            _train(model, **{**settings, **change}, checkpoint_dir=checkpoints, resume=True)
        assert named in str(error.value)
        assert "same arguments" in str(error.value) and "resume=False" in str(error.value)
        assert getattr(model, "train_settings_", None) is None  # nothing recorded
        assert (checkpoints / "last.ckpt").read_bytes() == written  # nothing written over it
    # a checkpoint of an older version records no optimisation settings: not checked
    from sctransformer.train._plan import OPTIMISATION_SETTINGS_KEY

    checkpoint = torch.load(checkpoints / "last.ckpt", weights_only=False)
    del checkpoint[OPTIMISATION_SETTINGS_KEY]
    torch.save(checkpoint, checkpoints / "last.ckpt")
    model = make_model("anndata", tmp_path)
    _train(model, **{**settings, "lr": 0.01}, checkpoint_dir=checkpoints, resume=True)
    assert len(model.history["loss_train"]) == 3  # epochs 2 to 4, the first resumed midway


def test_resuming_with_a_model_of_other_hyper_parameters_is_refused_before_the_weights_load(tmp_path):
    _, settings, checkpoints, written = _stopped_midway(tmp_path)
    adata = sct.datasets.synthetic(n_cells=100, n_genes=40, seed=0)
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    base = dict(d_model=16, n_layers=1, n_heads=2, max_length=32, n_bins=5, dropout=0.1, seed=1)
    for change, named in [
        ({"n_heads": 4}, "n_heads: 2 in the checkpoint, 4 now"),  # the same weights' shapes
        ({"d_model": 32}, "d_model: 16 in the checkpoint, 32 now"),
    ]:
        model = sct.GeneTransformer(adata, **{**base, **change})
        before = {k: v.clone() for k, v in model.module.state_dict().items()}
        with pytest.raises(ValueError, match="written by a model of other hyper-parameters") as error:
            _train(model, **settings, checkpoint_dir=checkpoints, resume=True)
        assert named in str(error.value)
        assert all(torch.equal(v, before[k]) for k, v in model.module.state_dict().items())
        assert (checkpoints / "last.ckpt").read_bytes() == written
    model = sct.GeneTransformer(adata, **{**base, "seed": 7, "attention": "sdpa", "n_heads": np.int64(2)})
    _train(model, **settings, checkpoint_dir=checkpoints, resume=True)
    assert len(model.history["loss_train"]) == 3
    # its checkpoints, written with a NumPy hyper-parameter, are read again (weights_only loading)
    again = sct.GeneTransformer(adata, **{**base, "n_heads": np.int64(2)})
    _train(again, **settings, checkpoint_dir=checkpoints, resume=True)


class _ColumnsUsed(pl.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.column_to_gene = module.column_to_gene.clone()


def test_a_resumed_run_reads_the_genes_of_its_own_anndata(tmp_path):
    """The same cells with their columns reversed: genes are matched by identifier, also in a resumed run."""
    make_model, settings, _ = _make_model_and_settings()
    model = make_model("anndata", tmp_path)
    model.save(tmp_path / "model")
    checkpoints = tmp_path / "ckpt"
    with pytest.raises(_Stop):
        _train(
            model,
            **settings,
            checkpoint_dir=checkpoints,
            checkpoint_every_n_steps=2,
            callbacks=[_StopAtStep(5)],
        )
    # a checkpoint of an older version also holds the columns of the AnnData it was written with
    checkpoint = torch.load(checkpoints / "last.ckpt", weights_only=False)
    checkpoint["state_dict"]["column_to_gene"] = torch.as_tensor(model._column_to_gene(model.adata))
    torch.save(checkpoint, checkpoints / "last.ckpt")
    reversed_columns = model.adata[:, ::-1].copy()
    model = sct.GeneTransformer.load(tmp_path / "model", adata=reversed_columns)
    used = _ColumnsUsed()
    _train(model, **settings, checkpoint_dir=checkpoints, resume=True, callbacks=[used])
    expected = torch.as_tensor(model._column_to_gene(reversed_columns))
    assert not torch.equal(expected, checkpoint["state_dict"]["column_to_gene"])
    assert torch.equal(used.column_to_gene, expected)


def test_resume_without_a_checkpoint_starts_fresh(tmp_path, caplog):
    make_model, settings, _ = _make_model_and_settings()
    uninterrupted = _train(make_model("anndata", tmp_path), **settings)
    with caplog.at_level("INFO", logger="sctransformer"):
        fresh = _train(
            make_model("anndata", tmp_path), **settings, checkpoint_dir=tmp_path / "empty", resume=True
        )
    assert "starting training from the beginning" in caplog.text
    for key in uninterrupted:
        torch.testing.assert_close(fresh[key], uninterrupted[key], rtol=0, atol=0)


def test_resuming_a_finished_run_trains_nothing_and_says_so(tmp_path):
    make_model, settings, _ = _make_model_and_settings()
    finished = _train(make_model("anndata", tmp_path), **settings, checkpoint_dir=tmp_path / "ckpt")
    again = make_model("anndata", tmp_path)
    with pytest.warns(UserWarning, match=r"written at the end of a finished run .* trained nothing"):
        again.train(**settings, checkpoint_dir=tmp_path / "ckpt", resume=True, logger=QUIET["logger"])
    for key, value in again.module.state_dict().items():
        torch.testing.assert_close(value, finished[key], rtol=0, atol=0)  # the finished run's weights
    make_model, settings, checkpoints, _ = _stopped_midway(tmp_path / "midway")
    with warnings.catch_warnings(record=True) as caught:  # a run resumed midway trains on, unwarned
        warnings.simplefilter("always")
        make_model("anndata", tmp_path).train(
            **settings, checkpoint_dir=checkpoints, resume=True, logger=QUIET["logger"]
        )
    assert not [w for w in caught if "finished run" in str(w.message)]


def test_resume_needs_a_checkpoint_directory(adata):
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, d_model=8, n_heads=2, n_layers=1)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        model.train(resume=True)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        model.train(checkpoint_every_n_steps=10)


def test_a_checkpoint_dir_that_cannot_be_a_directory_is_refused_before_training(adata, tmp_path):
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY)
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    with pytest.raises(ValueError, match=r"a_file.* as the directory of the checkpoints"):
        model.train(max_epochs=1, checkpoint_dir=path, callbacks=[_StopAtStep(0)], **QUIET)  # no step taken


@pytest.mark.parametrize(
    ("warmup", "kill_epoch"),
    [
        (0, 7),  # the epoch-7 checkpoint holds early stopping's check of epoch 6, the best one
        (0, 8),  # ... of epoch 7, the first without improvement
        (3, 8),  # and early stopping's warm-up count (its checks of epochs 0-2 were skipped)
    ],
)
def test_a_killed_run_with_early_stopping_resumes_to_the_uninterrupted_stop(tmp_path, warmup, kill_epoch):
    """Early stopping checks an epoch after the callbacks' epoch end: its checkpoint holds that check.

    The uninterrupted run stops after 9 epochs (its validation loss is lowest after epoch 6). A run
    killed at the start of epoch 7 or 8 and resumed stops there too, with the same weights; so does
    a run resumed from the stopped run's own checkpoint, without training.
    """
    make_model, _, _ = _make_model_and_settings()
    settings = {
        "max_epochs": 14,
        "batch_size": 32,
        "seed": 2,
        "lr": 0.05,
        "calibrate": False,
        "enable_progress_bar": False,
        "early_stopping": True,
        "early_stopping_patience": 2,
        "early_stopping_warmup_epochs": warmup,
    }
    model = make_model("shards", tmp_path)
    uninterrupted = _train(model, **settings, checkpoint_dir=tmp_path / "uninterrupted")
    n_epochs = len(model.history["loss_train"])
    assert n_epochs == 9 < settings["max_epochs"]  # stopped early

    checkpoints = tmp_path / "ckpt"
    with pytest.raises(_Stop):  # 3 minibatches per epoch
        _train(
            make_model("shards", tmp_path),
            **settings,
            checkpoint_dir=checkpoints,
            callbacks=[_StopAtStep(3 * kill_epoch)],
        )
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["epoch"] == kill_epoch - 1
    model = make_model("shards", tmp_path)
    resumed = _train(model, **settings, checkpoint_dir=checkpoints, resume=True)
    assert kill_epoch + len(model.history["loss_train"]) == n_epochs  # history: the resumed epochs
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0)

    model = make_model("shards", tmp_path)
    finished = _train(model, **settings, checkpoint_dir=tmp_path / "uninterrupted", resume=True)
    assert "loss_train" not in model.history
    for key in uninterrupted:
        torch.testing.assert_close(finished[key], uninterrupted[key], rtol=0, atol=0)
    if kill_epoch == 7:  # resumed without early stopping, the stopped run trains on to max_epochs
        model = make_model("shards", tmp_path)
        _train(
            model,
            **{**settings, "early_stopping": False},
            checkpoint_dir=tmp_path / "uninterrupted",
            resume=True,
        )
        assert len(model.history["loss_train"]) == settings["max_epochs"] - n_epochs


class _TerminateInValidation(pl.Callback):
    """A SIGTERM (a cluster pre-empting the job) during the validation of ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.current_epoch == self.epoch and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_run_terminated_after_an_epoch_end_keeps_that_epochs_checkpoint(tmp_path):
    # Lightning holds the SIGTERM back until the epoch's end hooks have run, then raises
    make_model, settings, _ = _make_model_and_settings()
    checkpoints = tmp_path / "ckpt"
    with pytest.raises(BaseException) as raised:
        _train(
            make_model("anndata", tmp_path),
            **settings,
            checkpoint_dir=checkpoints,
            callbacks=[_TerminateInValidation(1)],
        )
    assert "SIGTERM" in type(raised.value).__name__
    checkpoint = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (1, 6)  # 3 minibatches per epoch


def test_the_epoch_end_checkpoint_holds_the_weights_of_that_epoch_end(tmp_path):
    # stochastic weight averaging copies the averaged weights into the model at the end of training,
    # after the last epoch's checkpoint is taken and before it is written
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    class LastEpochEnd(pl.Callback):
        def on_train_epoch_end(self, trainer, module) -> None:
            self.weights = {k: v.detach().clone() for k, v in module.module.state_dict().items()}

    make_model, settings, _ = _make_model_and_settings()
    recorder = LastEpochEnd()
    swa = StochasticWeightAveraging(swa_lrs=1e-3, swa_epoch_start=1)
    _train(make_model("anndata", tmp_path), **settings, checkpoint_dir=tmp_path, callbacks=[swa, recorder])
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert any(
        not torch.equal(saved[f"module.{k}"], v) for k, v in swa._average_model.module.state_dict().items()
    )
    for key, value in recorder.weights.items():
        torch.testing.assert_close(saved[f"module.{key}"], value, rtol=0, atol=0)
