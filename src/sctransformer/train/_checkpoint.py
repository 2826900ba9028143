"""Periodic Lightning checkpoints that a killed training run resumes from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from sctransformer.data._splitting import check_order_settings

LAST_CHECKPOINT = "last.ckpt"


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

    A resumed run must cut the same training minibatches as the run that wrote the checkpoint:
    the training loader's state records what sets them (seed, training cells, batch size, number
    of processes, ...; :func:`~sctransformer.data.make_resumable`), and a run resumed with other
    values raises a :class:`ValueError` before it trains, also from a checkpoint written at an
    epoch end (whose loader state Lightning does not hand back to the loader).

    Parameters
    ----------
    dirpath
        Directory of ``last.ckpt``.
    every_n_steps
        Also checkpoint after every this many optimisation steps; ``None``: at epoch ends only.
    """

    def __init__(self, dirpath: str | os.PathLike, every_n_steps: int | None = None) -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive integer or None, got {every_n_steps!r}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self._last_step = -1
        self._resumed_loader_states: list[dict[str, Any]] = []

    @property
    def last(self) -> Path:
        """Path of the most recent checkpoint."""
        return self.dirpath / LAST_CHECKPOINT

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Keep the training loaders' states of the checkpoint being resumed, to check them at the start."""
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        self._resumed_loader_states = list(fit_loop.get("state_dict", {}).get("combined_loader", []))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Raise if the resumed run's training minibatches differ from those of the checkpoint's run."""
        states, self._resumed_loader_states = self._resumed_loader_states, []
        loaders = trainer.train_dataloader
        if isinstance(loaders, dict):
            loaders = list(loaders.values())
        elif not isinstance(loaders, list | tuple):
            loaders = [loaders]
        stateful = [loader for loader in loaders if callable(getattr(loader, "state_dict", None))]
        for recorded, loader in zip(states, stateful, strict=False):
            check_order_settings(recorded, loader.state_dict())

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
        """Checkpoint the finished epoch."""
        self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        partial = self.dirpath / f".{LAST_CHECKPOINT}.partial"
        trainer.save_checkpoint(partial)
        if trainer.is_global_zero:
            os.replace(partial, self.last)
