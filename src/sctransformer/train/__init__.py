"""Lightning training plans: masking, losses, learning-rate schedule, logged metrics."""

from ._checkpoint import LAST_CHECKPOINT, PeriodicCheckpoint
from ._plan import MaskedModelingPlan, batch_seed, mask_genes, mask_tokens, warmup_cosine
from ._runner import HistoryTrainRunner

__all__ = [
    "LAST_CHECKPOINT",
    "HistoryTrainRunner",
    "MaskedModelingPlan",
    "PeriodicCheckpoint",
    "batch_seed",
    "mask_genes",
    "mask_tokens",
    "warmup_cosine",
]
