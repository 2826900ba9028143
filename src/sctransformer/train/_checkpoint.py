"""Periodic Lightning checkpoints that a killed training run resumes from."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

LAST_CHECKPOINT = "last.ckpt"


class EpochCheckpoint(Callback):
    """Write a full Lightning checkpoint (weights, optimizer, scheduler, loop position) every epoch.

    The file is Lightning's own format, written by :meth:`lightning.pytorch.Trainer.save_checkpoint`
    at the end of each training epoch (where Lightning's ``ModelCheckpoint`` writes) and read back
    by ``Trainer.fit(ckpt_path=...)``. Each write goes beside ``last.ckpt`` and is renamed into
    place, so a run killed while writing keeps the previous checkpoint.

    Parameters
    ----------
    dirpath
        Directory of ``last.ckpt``.
    """

    def __init__(self, dirpath: str | os.PathLike) -> None:
        self.dirpath = Path(dirpath)

    @property
    def last(self) -> Path:
        """Path of the most recent checkpoint."""
        return self.dirpath / LAST_CHECKPOINT

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Checkpoint the finished epoch."""
        self.dirpath.mkdir(parents=True, exist_ok=True)
        partial = self.dirpath / f".{LAST_CHECKPOINT}.partial"
        trainer.save_checkpoint(partial)
        if trainer.is_global_zero:
            os.replace(partial, self.last)
