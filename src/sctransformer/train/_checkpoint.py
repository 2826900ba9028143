"""Periodic Lightning checkpoints that a killed training run resumes from."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, EarlyStopping
from lightning_utilities.core.apply_func import apply_to_collection

from sctransformer.data._splitting import check_order_settings

LAST_CHECKPOINT = "last.ckpt"
logger = logging.getLogger(__name__)


class PeriodicCheckpoint(Callback):
    """Write a full Lightning checkpoint every epoch and, optionally, every ``every_n_steps`` steps.

    A checkpoint holds the weights, optimizer, scheduler, loop position and the training loader's
    position in the epoch; the masks and dropout of each minibatch are seeded by its place in the
    run (:func:`~sctransformer.train.batch_seed`), so a run resumed from a checkpoint midway
    through an epoch goes on exactly as the uninterrupted run. The file is Lightning's own format, written by
    :meth:`lightning.pytorch.Trainer.save_checkpoint` where Lightning's ``ModelCheckpoint``
    writes (end of a training batch, end of an epoch) and read back by
    ``Trainer.fit(ckpt_path=...)``. Each write goes beside ``last.ckpt`` and is renamed into place,
    so a run killed while writing keeps the previous checkpoint.

    Lightning calls the monitoring callbacks' ``on_train_epoch_end`` (early stopping's check of
    the epoch) after this callback's. The checkpoint of an epoch is therefore taken in this
    callback's ``on_train_epoch_end`` and written at the next epoch's start or at the end of
    training, with the states that the callbacks called after this one have by then: it holds the
    epoch's early-stopping check. It also holds what early stopping does not checkpoint itself:
    scvi-tools' warm-up count (``early_stopping_warmup_epochs``). A run resumed from the checkpoint of
    a run that early stopping ended ends without training, if it has the same early stopping. A run
    stopped by an exception (SIGTERM, Ctrl-C, an error) after an epoch's end still writes that epoch's
    checkpoint.

    A resumed run must cut the same training minibatches as the run that wrote the checkpoint:
    the training loader's state records what sets them (seed, training cells, batch size, number
    of processes, ...; :func:`~sctransformer.data.make_resumable`), and a run resumed with other
    values raises a :class:`ValueError` before it trains, also from a checkpoint written at an
    epoch end (whose loader state Lightning does not hand back to the loader).

    Parameters
    ----------
    dirpath
        Directory of ``last.ckpt``, created here (with its parents) if missing.
    every_n_steps
        Also checkpoint after every this many optimisation steps; ``None``: at epoch ends only.

    Raises
    ------
    ValueError
        If ``dirpath`` cannot be created as a directory (e.g. it is a file): before any training.
    """

    def __init__(self, dirpath: str | os.PathLike, every_n_steps: int | None = None) -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive integer or None, got {every_n_steps!r}")
        self.dirpath = Path(dirpath)
        try:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(
                f"cannot use {str(self.dirpath)!r} as the directory of the checkpoints ({err}); pass "
                "checkpoint_dir= a directory, or the path of one to create"
            ) from err
        self.every_n_steps = every_n_steps
        self._last_step = -1
        #: Whether this run has written a checkpoint (``last`` may be an earlier run's until it has)
        self.wrote = False
        self._resumed_loader_states: list[dict[str, Any]] = []
        self._epoch_end: dict[str, Any] | None = None  # the checkpoint of an epoch end, to be written
        self._run_state: dict[str, Any] = {}
        self._resumed_run_state: dict[str, Any] = {}

    @property
    def last(self) -> Path:
        """Path of the most recent checkpoint."""
        return self.dirpath / LAST_CHECKPOINT

    def state_dict(self) -> dict[str, Any]:
        """Early stopping's warm-up counts when the checkpoint was taken."""
        return dict(self._run_state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpoint's early-stopping counts, to restore them at the start."""
        self._resumed_run_state = dict(state_dict)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Keep the training loaders' states of the checkpoint being resumed, to check them at the start."""
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        self._resumed_loader_states = list(fit_loop.get("state_dict", {}).get("combined_loader", []))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Raise if the resumed run's training minibatches differ from those of the checkpoint's run.

        Then restore early stopping's warm-up counts, and end the run at once where early stopping
        had stopped it.
        """
        states, self._resumed_loader_states = self._resumed_loader_states, []
        loaders = trainer.train_dataloader
        if isinstance(loaders, dict):
            loaders = list(loaders.values())
        elif not isinstance(loaders, list | tuple):
            loaders = [loaders]
        stateful = [loader for loader in loaders if callable(getattr(loader, "state_dict", None))]
        for recorded, loader in zip(states, stateful, strict=False):
            check_order_settings(recorded, loader.state_dict())
        run_state, self._resumed_run_state = self._resumed_run_state, {}
        steps = run_state.get("early_stopping_steps", {})
        for callback in trainer.callbacks:
            if isinstance(callback, EarlyStopping) and callback.state_key in steps:
                callback._current_step = steps[callback.state_key]
        for callback in trainer.callbacks:  # restored by Lightning where this run has the same one
            reason = getattr(callback, "stopping_reason", None)
            if isinstance(callback, EarlyStopping) and reason is not None and reason.name != "NOT_STOPPED":
                logger.info("the checkpoint's run was ended by early stopping; nothing left to train")
                trainer.should_stop = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        """Checkpoint every ``every_n_steps`` steps (not at an epoch's last batch: the epoch end does)."""
        step = trainer.global_step
        if self.every_n_steps is None or step % self.every_n_steps or step == self._last_step:
            return
        epoch_loop = trainer.fit_loop.epoch_loop
        if epoch_loop.batch_progress.is_last_batch or epoch_loop._should_accumulate():
            return  # the epoch end saves; mid-accumulation gradients would be lost
        self._last_step = step
        self._save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take the checkpoint of the finished epoch (written once early stopping has checked the epoch)."""
        # what Trainer.save_checkpoint writes, copied: callbacks may change the weights in place
        # before it is written (e.g. stochastic weight averaging at the end of training)
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        self._epoch_end = apply_to_collection(
            checkpoint, torch.Tensor, lambda t: t.detach().to("cpu", copy=True)
        )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the checkpoint of the previous epoch."""
        self._save_epoch_end(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the checkpoint of the last epoch."""
        self._save_epoch_end(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Write the checkpoint of a finished epoch when the run stops before the next (SIGTERM, Ctrl-C, error)."""
        self._save_epoch_end(trainer, synchronize=False)  # other ranks may not be here to wait for

    def _save_epoch_end(self, trainer: pl.Trainer, synchronize: bool = True) -> None:
        checkpoint, self._epoch_end = self._epoch_end, None
        if checkpoint is None:
            return
        # the callbacks that Lightning called after this one at the epoch's end (FitLoop.on_advance_end):
        # the later ordinary ones, then the monitoring ones, early stopping among them
        monitoring = (EarlyStopping, Checkpoint)
        ordinary = [callback for callback in trainer.callbacks if not isinstance(callback, monitoring)]
        later = ordinary[ordinary.index(self) + 1 :] if self in ordinary else []
        later += [callback for callback in trainer.callbacks if isinstance(callback, monitoring)]
        states = checkpoint.setdefault("callbacks", {})
        for callback in [*later, self]:
            states.pop(callback.state_key, None)
            state = self._take_run_state(trainer) if callback is self else callback.state_dict()
            if state:
                states[callback.state_key] = state
        self._write(trainer, checkpoint, synchronize)

    def _take_run_state(self, trainer: pl.Trainer) -> dict[str, Any]:
        """Record what early stopping does not checkpoint itself; returns :meth:`state_dict`."""
        self._run_state = {
            "early_stopping_steps": {
                callback.state_key: callback._current_step
                for callback in trainer.callbacks
                if isinstance(callback, EarlyStopping) and hasattr(callback, "_current_step")
            },
        }
        return self.state_dict()

    def _save(self, trainer: pl.Trainer) -> None:
        self._take_run_state(trainer)
        self._write(trainer)

    def _write(
        self, trainer: pl.Trainer, checkpoint: dict[str, Any] | None = None, synchronize: bool = True
    ) -> None:
        """Write ``checkpoint`` (default: the trainer's present state) as :attr:`last`."""
        partial = self.dirpath / f".{LAST_CHECKPOINT}.partial"
        if checkpoint is None:
            trainer.save_checkpoint(partial, weights_only=False)
        else:  # what Trainer.save_checkpoint does with the state it takes
            trainer.strategy.save_checkpoint(checkpoint, partial)
            if synchronize:
                trainer.strategy.barrier("PeriodicCheckpoint._write")
        if trainer.is_global_zero:
            os.replace(partial, self.last)
        self.wrote = True
