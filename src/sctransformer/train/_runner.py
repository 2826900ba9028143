"""scvi-tools' training runner, with a history that keeps every curve across ``train()`` calls."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scvi.train import TrainRunner
from scvi.train._trainrunner import _safe_load_logger_history


class HistoryTrainRunner(TrainRunner):
    """:class:`scvi.train.TrainRunner` whose ``model.history`` also gains curves first logged later.

    scvi-tools extends only the curves a model already had after its first training, so curves
    that first appear in a later run (phenotype losses after :meth:`load_query_data`, validation
    after a run without validation cells, anything after a run with ``logger=False``) were lost.
    Here every curve of the run is appended. The run's epochs are numbered on from the last epoch
    of the history (in any curve) and keep their spacing: validation every second epoch stays
    every second epoch, and a run resumed from a checkpoint (whose epochs do not start at 0) is
    followed by the next run's epochs, never by the same numbers again.
    """

    def _update_history(self) -> None:
        previous = self.model.history_
        if not (self.model.is_trained_ and isinstance(previous, dict) and self.trainer.is_global_zero):
            super()._update_history()
            return
        new = _safe_load_logger_history(self.trainer) or {}
        ends = [frame.index.max() for frame in previous.values() if len(frame)]
        offset = int(max(ends)) + 1 if ends else 0
        starts = [frame.index.min() for frame in new.values() if len(frame)]
        first = int(min(starts)) if starts else 0  # the first epoch of this run
        history = dict(previous)
        for key, frame in new.items():
            index = np.asarray(frame.index, dtype=np.int64) - first + offset
            frame.index = pd.Index(index, name=frame.index.name)
            if key in previous:
                frame.index.name = previous[key].index.name
                frame = pd.concat([previous[key], frame])
            history[key] = frame
        self.model.history_ = history
