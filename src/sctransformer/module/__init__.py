"""Plain-torch building blocks: tokenizer, attention, the gene transformer module."""

from ._attention import (
    ATTENTION_BACKENDS,
    AttentionBackend,
    EncoderBlock,
    PackedTokens,
    SelfAttention,
    check_attention,
    sdpa_varlen_reference,
    select_attention,
)
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
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "EncoderBlock",
    "GeneTransformerModule",
    "LossOutput",
    "PackedTokens",
    "Pooling",
    "SelfAttention",
    "TokenizedCells",
    "Tokenizer",
    "check_attention",
    "phenotype_loss",
    "reverse_gradient",
    "sdpa_varlen_reference",
    "select_attention",
    "symmetric_info_nce",
]
