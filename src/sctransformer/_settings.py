"""Global settings: seed, default batch size, device."""

from __future__ import annotations

import logging
from typing import Literal

logger = logging.getLogger("sctransformer")


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
        self.seed: int = 0
        self.batch_size: int = 64
        self.verbosity = logging.INFO

    @property
    def verbosity(self) -> int:
        """Logging level of the ``sctransformer`` logger."""
        return logger.level

    @verbosity.setter
    def verbosity(self, level: int | Literal["debug", "info", "warning", "error"]) -> None:
        if isinstance(level, str):
            level = getattr(logging, level.upper())
        logger.setLevel(level)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s sctransformer: %(message)s"))
            logger.addHandler(handler)
            logger.propagate = False


settings = Settings()
