"""Plain-torch building blocks: tokenizer, attention, the gene transformer module."""

from ._attention import EncoderBlock, SelfAttention
from ._module import (
    GeneTransformerModule,
    LossOutput,
    Pooling,
    phenotype_loss,
    reverse_gradient,
    symmetric_info_nce,
)
from ._tokenizer import TokenizedCells, Tokenizer

__all__ = [
    "EncoderBlock",
    "GeneTransformerModule",
    "LossOutput",
    "Pooling",
    "SelfAttention",
    "TokenizedCells",
    "Tokenizer",
    "phenotype_loss",
    "reverse_gradient",
    "symmetric_info_nce",
]
