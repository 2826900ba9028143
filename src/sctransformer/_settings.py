"""Global settings: seed, default batch size, device."""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np

logger = logging.getLogger("sctransformer")


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` as a Python int; refuse anything but an integer in ``[0, 2**32)`` (Lightning's and NumPy's)."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
        raise ValueError(f"{name} must be an integer >= 0 and < 2**32, got {seed!r}")
    return int(seed)


class Settings:
    """Package-wide defaults, reachable as ``sctransformer.settings``.

    Attributes
    ----------
    seed
        Seed used when a function is not given one explicitly (model initialisation, data split,
        masking).
    batch_size
        Default minibatch size for inference (embedding, prediction).
    verbosity
        Logging level of the ``sctransformer`` logger.
    """

    def __init__(self) -> None:
        self.seed = 0
        self.batch_size = 64
        self.verbosity = logging.INFO

    @property
    def seed(self) -> int:
        """Seed used when a function is not given one (checked when set, as a seed passed is)."""
        return self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        self._seed = check_seed(value, "sctransformer.settings.seed")

    @property
    def batch_size(self) -> int:
        """Default minibatch size for inference (checked when set, as a ``batch_size`` passed is)."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"sctransformer.settings.batch_size must be a positive integer, got {value!r}")
        self._batch_size = int(value)

    @property
    def verbosity(self) -> int:
        """Logging level of the ``sctransformer`` logger."""
        return logger.level

    @verbosity.setter
    def verbosity(self, level: int | Literal["debug", "info", "warning", "error"]) -> None:
        names = {
            "debug": logging.DEBUG,
            "info": logging.INFO,
            "warning": logging.WARNING,
            "error": logging.ERROR,
        }
        if isinstance(level, str) and level.lower() in names:
            level = names[level.lower()]
        if isinstance(level, bool) or not isinstance(level, int | np.integer):
            raise ValueError(
                f"sctransformer.settings.verbosity must be one of {list(names)} or a logging level "
                f"(logging.INFO), got {level!r}"
            )
        logger.setLevel(int(level))
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s sctransformer: %(message)s"))
            logger.addHandler(handler)
            logger.propagate = False


settings = Settings()
