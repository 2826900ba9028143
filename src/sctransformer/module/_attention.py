"""Pre-LayerNorm transformer encoder blocks on ``scaled_dot_product_attention``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head self-attention with a key-padding mask, on fused SDPA kernels.

    Parameters
    ----------
    d_model
        Token width.
    n_heads
        Number of heads; must divide ``d_model``.

    Notes
    -----
    There is no dropout on the attention probabilities: on CPU it forces SDPA's unfused path and
    drawing the mask cost a third of a training step. Dropout acts on the residual branches.
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, length, d = x.shape
        qkv = self.qkv(x).view(n, length, 3, self.n_heads, d // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor, *, return_keys_values: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attend; ``key_mask`` is ``(n, length)`` with ``True`` for tokens that may be attended.

        With ``return_keys_values``, also the keys and values ``(n, heads, length, d_head)``.
        """
        n, length, d = x.shape
        q, k, v = self._heads(x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        out = self.out(out.transpose(1, 2).reshape(n, length, d))
        return (out, k, v) if return_keys_values else out

    def attend(
        self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor
    ) -> torch.Tensor:
        """Attention of the query tokens ``x`` ``(n, m, d)`` to given keys and values."""
        n, m, d = x.shape
        q = F.linear(x, self.qkv.weight[:d], self.qkv.bias[:d]).view(n, m, self.n_heads, d // self.n_heads)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=key_mask[:, None, None, :]
        )
        return self.out(out.transpose(1, 2).reshape(n, m, d))

    def attention_probabilities(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Explicit ``softmax(QK^T / sqrt(d_head))``: ``(n, heads, length, length)``."""
        q, k, _ = self._heads(x)
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        return scores.softmax(-1)


class EncoderBlock(nn.Module):
    """Pre-LN block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.norm_attention = nn.LayerNorm(d_model)
        self.attention = SelfAttention(d_model, n_heads)
        self.norm_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor, *, return_keys_values: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Apply the block; with ``return_keys_values``, also its attention keys and values."""
        attended = self.attention(self.norm_attention(x), key_mask, return_keys_values=return_keys_values)
        out, keys, values = attended if return_keys_values else (attended, None, None)
        x = x + self.dropout(out)
        x = x + self.dropout(self.mlp(self.norm_mlp(x)))
        return (x, keys, values) if return_keys_values else x

    def decode(
        self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor
    ) -> torch.Tensor:
        """Apply the block to query tokens ``x`` that attend to given keys and values only."""
        x = x + self.dropout(self.attention.attend(self.norm_attention(x), keys, values, key_mask))
        return x + self.dropout(self.mlp(self.norm_mlp(x)))
