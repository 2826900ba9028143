"""Lightning training plans: masking, losses, learning-rate schedule, logged metrics."""

from ._plan import MaskedModelingPlan, mask_tokens, warmup_cosine

__all__ = ["MaskedModelingPlan", "mask_tokens", "warmup_cosine"]
