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
    Here every curve of the run is appended; a new one is indexed from the number of epochs
    trained so far.
    """

    def _update_history(self) -> None:
        previous = self.model.history_
        if not (self.model.is_trained_ and isinstance(previous, dict) and self.trainer.is_global_zero):
            super()._update_history()
            return
        new = _safe_load_logger_history(self.trainer) or {}
        trained_epochs = max((len(frame) for frame in previous.values()), default=0)
        history = dict(previous)
        for key, frame in new.items():
            start = len(previous[key]) if key in previous else trained_epochs
            frame.index = pd.Index(np.arange(start, start + len(frame)), name=frame.index.name)
            if key in previous:
                frame.index.name = previous[key].index.name
                frame = pd.concat([previous[key], frame])
            history[key] = frame
        self.model.history_ = history
