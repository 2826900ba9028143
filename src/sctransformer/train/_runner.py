"""scvi-tools' training runner, with a history that keeps every curve across ``train()`` calls."""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
from scvi.train import TrainRunner, _trainrunner
from scvi.train._trainrunner import _safe_load_logger_history

#: What scvi-tools' runner prints to stdout (labelled NameError) before it re-raises a training error
_SCVI_FAILURE_NOTICE = "Exception raised during training."


@contextmanager
def _without_failure_notice() -> Iterator[None]:
    """Drop scvi-tools' printed notice of a failed run: the error itself is raised, once, as it is."""

    def quiet(*args: Any, **kwargs: Any) -> None:
        if not (args and args[0] == _SCVI_FAILURE_NOTICE):
            builtins.print(*args, **kwargs)

    had = "print" in vars(_trainrunner)
    previous = vars(_trainrunner).get("print")
    _trainrunner.print = quiet  # the module's global name shadows the builtin it calls
    try:
        yield
    finally:
        if had:
            _trainrunner.print = previous
        else:
            del _trainrunner.print


class HistoryTrainRunner(TrainRunner):
    """:class:`scvi.train.TrainRunner` whose ``model.history`` also gains curves first logged later.

    scvi-tools extends only the curves a model already had after its first training, so curves
    that first appear in a later run (phenotype losses after :meth:`load_query_data`, validation
    after a run without validation cells, anything after a run with ``logger=False``) were lost.
    Here every curve of the run is appended. The run's epoch curves (``<name>_train``,
    ``<name>_validation``) are numbered on from the last epoch of the history's epoch curves and
    keep their spacing: validation every second epoch stays every second epoch, and a run resumed
    from a checkpoint (whose epochs do not start at 0) is followed by the next run's epochs, never
    by the same numbers again. Other curves (e.g. a ``LearningRateMonitor``'s, one value per step)
    go on from their own length. A failed run raises its error without scvi-tools' printed
    notice (on stdout, labelled ``NameError``).
    """

    def _run_training_core(self) -> None:
        with _without_failure_notice():
            super()._run_training_core()

    def _update_history(self) -> None:
        previous = self.model.history_
        if not (self.model.is_trained_ and isinstance(previous, dict) and self.trainer.is_global_zero):
            super()._update_history()
            return
        new = _safe_load_logger_history(self.trainer) or {}
        ends = [frame.index.max() for key, frame in previous.items() if _per_epoch(key) and len(frame)]
        offset = int(max(ends)) + 1 if ends else 0
        starts = [frame.index.min() for key, frame in new.items() if _per_epoch(key) and len(frame)]
        first = int(min(starts)) if starts else 0  # the first epoch of this run
        history = dict(previous)
        for key, frame in new.items():
            if _per_epoch(key):
                index = np.asarray(frame.index, dtype=np.int64) - first + offset
            else:  # a curve of steps (or anything else): on from its own length
                start = len(previous[key]) if key in previous else 0
                index = np.arange(start, start + len(frame))
            frame.index = pd.Index(index, name=frame.index.name)
            if key in previous:
                frame.index.name = previous[key].index.name
                frame = pd.concat([previous[key], frame])
            history[key] = frame
        self.model.history_ = history


def _per_epoch(key: str) -> bool:
    """Whether a history curve holds one value per epoch (the training plan's ``<name>_<stage>``)."""
    return key.rsplit("_", 1)[-1] in ("train", "validation")
