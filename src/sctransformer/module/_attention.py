"""Pre-LayerNorm transformer encoder blocks, on ``scaled_dot_product_attention`` or packed varlen kernels.

Two ways to run a minibatch of cells of different lengths:

- **padded** (``"sdpa"``): tokens ``(n, length, d)`` with a key-padding mask, on torch's fused
  ``scaled_dot_product_attention``; works on every device and dtype.
- **packed** (``"varlen"``, ``"flash"``): only the real tokens, cell after cell, ``(total, d)``
  (:class:`PackedTokens`), so that no layer (attention, MLP, layer norm) computes on padding. The
  attention runs on a variable-length kernel that takes each cell's span from cumulative lengths
  (``cu_seqlens``): torch's own ``torch.nn.attention.varlen.varlen_attn`` or flash-attn's
  ``flash_attn_varlen_func``. Both are CUDA-only half-precision kernels.

Query tokens (genes whose expression is predicted) attend to their cell but are never attended
to: in the packed layout they are queries and not keys (separate ``cu_seq_q`` and ``cu_seq_k``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sctransformer.data._validation import positive_int

AttentionBackend = Literal["auto", "sdpa", "varlen", "flash"]
ATTENTION_BACKENDS = ("auto", "sdpa", "varlen", "flash")
_HALF = (torch.float16, torch.bfloat16)
#: On CUDA, padded SDPA minibatches are padded further to a multiple of this many tokens. SDPA's
#: cuDNN kernels build a plan per sequence length (88 ms per new length against 1.6 ms per call on
#: an H200, ``benchmarks/attention.py``), so length-bucketed minibatches, each of its own length,
#: trained 4x slower than random ones; rounded up, a run needs a few plans.
CUDA_SDPA_LENGTH_MULTIPLE = 64


@dataclass(frozen=True)
class PackedTokens:
    """Where the real tokens of a padded ``(n, length)`` minibatch go in the packed layout.

    Within each cell the keys (tokens that may be attended) come first, then its other present
    tokens (queries), each in their padded order; cells follow each other.

    Attributes
    ----------
    index
        ``(total,)`` flat position ``cell * length + position`` of each packed token.
    key_rows
        ``(total_k,)`` rows of the packed tokens that are keys.
    cu_seq_q, cu_seq_k
        ``(n + 1,)`` int32 cumulative numbers of tokens and of keys per cell.
    max_q, max_k
        Most tokens and most keys of one cell.
    shape
        ``(n, length)`` of the padded minibatch.
    """

    index: torch.Tensor
    key_rows: torch.Tensor
    cu_seq_q: torch.Tensor
    cu_seq_k: torch.Tensor
    max_q: int
    max_k: int
    shape: tuple[int, int]

    @classmethod
    def from_masks(cls, key_mask: torch.Tensor, present: torch.Tensor, *, check: bool = True) -> PackedTokens:
        """Pack the ``present`` tokens ``(n, length)``; ``key_mask`` (a subset) marks the keys.

        ``check=False`` skips checking that every key is present (a device sync).
        """
        if check and bool((key_mask & ~present).any()):
            raise ValueError("every key must be a present token")
        n, length = present.shape
        position = torch.arange(length, device=present.device)
        rank = (~key_mask).long() * length + position  # keys first, then the other present tokens
        order = rank.masked_fill(~present, 2 * length).argsort(dim=1, stable=True)
        n_tokens, n_keys = present.sum(1), key_mask.sum(1)
        take = position < n_tokens[:, None]
        flat = order + torch.arange(n, device=present.device)[:, None] * length
        is_key = (position < n_keys[:, None])[take]
        return cls(
            index=flat[take],
            key_rows=torch.nonzero(is_key).squeeze(1),
            cu_seq_q=F.pad(n_tokens.cumsum(0), (1, 0)).to(torch.int32),
            cu_seq_k=F.pad(n_keys.cumsum(0), (1, 0)).to(torch.int32),
            max_q=int(n_tokens.max()) if n else 0,
            max_k=int(n_keys.max()) if n else 0,
            shape=(n, length),
        )

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, length, d)`` -> ``(total, d)``."""
        return x.reshape(-1, x.shape[-1])[self.index]

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``(total, d)`` -> ``(n, length, d)``, zeros where no token was packed."""
        n, length = self.shape
        out = packed.new_zeros(n * length, packed.shape[-1])
        return out.index_copy(0, self.index, packed).view(n, length, -1)


def sdpa_length_padding(x: torch.Tensor) -> int:
    """Tokens to append to a padded SDPA minibatch ``x`` ``(n, length, d)`` (on CUDA only).

    Up to a multiple of :data:`CUDA_SDPA_LENGTH_MULTIPLE`; elsewhere none.
    """
    return -x.shape[1] % CUDA_SDPA_LENGTH_MULTIPLE if x.is_cuda else 0


def check_attention(backend: str) -> None:
    """Refuse a name that is not an attention backend."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {list(ATTENTION_BACKENDS)}, got {backend!r}")


VarlenKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PackedTokens], torch.Tensor]


def sdpa_varlen_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedTokens
) -> torch.Tensor:
    """A varlen kernel made of one SDPA call per cell (any device and dtype; slow): the reference.

    ``q`` is ``(total, heads, d_head)``, ``k`` and ``v`` ``(total_k, heads, d_head)``.
    """
    out = torch.empty_like(q)
    spans_q, spans_k = pairwise(packed.cu_seq_q.tolist()), pairwise(packed.cu_seq_k.tolist())
    for (q0, q1), (k0, k1) in zip(spans_q, spans_k, strict=True):
        if q1 > q0:
            out[q0:q1] = F.scaled_dot_product_attention(
                q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1)
            ).transpose(0, 1)
    return out


def _half(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kernels take fp16/bf16 only: outside autocast, float32 inputs run in bf16."""
    if q.dtype in _HALF:
        return q, k.to(q.dtype), v.to(q.dtype)
    return q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)


def torch_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedTokens) -> torch.Tensor:
    """Torch's own ``varlen_attn`` (flash kernels shipped with torch, CUDA, half precision)."""
    from torch.nn.attention.varlen import varlen_attn

    qh, kh, vh = _half(q.contiguous(), k, v)
    out = varlen_attn(qh, kh, vh, packed.cu_seq_q, packed.cu_seq_k, packed.max_q, packed.max_k)
    return out.to(q.dtype)


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedTokens) -> torch.Tensor:
    """flash-attn's ``flash_attn_varlen_func`` (the ``flash`` extra, CUDA, half precision)."""
    from flash_attn import flash_attn_varlen_func

    qh, kh, vh = _half(q, k, v)
    out = flash_attn_varlen_func(
        qh,
        kh,
        vh,
        packed.cu_seq_q,
        packed.cu_seq_k,
        packed.max_q,
        packed.max_k,
        dropout_p=0.0,
        deterministic=torch.are_deterministic_algorithms_enabled(),
    )
    return out.to(q.dtype)


#: The packed kernels by backend name.
VARLEN_KERNELS: dict[str, VarlenKernel] = {"varlen": torch_varlen, "flash": flash_varlen}


def _half_precision(x: torch.Tensor) -> bool:
    """Whether layers on ``x``'s device compute in fp16/bf16 (autocast or half weights)."""
    if x.dtype in _HALF:
        return True
    device = x.device.type
    try:
        return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in _HALF
    except TypeError:  # torch < 2.4: CUDA autocast only, queried without a device
        return device == "cuda" and torch.is_autocast_enabled() and torch.get_autocast_gpu_dtype() in _HALF


@lru_cache
def _importable(module: str) -> bool:
    """Whether ``module`` imports (an install built for another torch fails here, not later)."""
    if importlib.util.find_spec(module) is None:
        return False
    try:
        importlib.import_module(module)
    except (ImportError, OSError):
        return False
    return True


def attention_unusable(backend: str, x: torch.Tensor, head_dim: int) -> str | None:
    """Why the packed ``backend`` cannot run on ``x``'s device (``None``: it can)."""
    if x.device.type != "cuda":
        return f"its kernels run on CUDA GPUs only, and the model is on {x.device.type}"
    if backend == "flash" and not _importable("flash_attn"):
        return "flash-attn is not installed or does not import (pip install 'sctransformer[flash]')"
    if backend == "varlen" and not (
        _importable("torch.nn.attention.varlen")
        and getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)()
    ):
        return f"this torch ({torch.__version__}) has no torch.nn.attention.varlen with flash kernels"
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return "its kernels need a GPU of compute capability 8.0 (Ampere) or newer"
    if head_dim % 8 or head_dim > 256:
        return f"its kernels need d_model / n_heads to be a multiple of 8 up to 256, got {head_dim}"
    return None


def select_attention(requested: str, x: torch.Tensor, head_dim: int) -> str:
    """The backend that runs: ``"sdpa"``, ``"varlen"`` or ``"flash"``.

    ``"auto"`` takes flash-attn where installed, else torch's varlen kernel, when the model runs
    in half precision (bf16/fp16 autocast) on a CUDA GPU that has them, unless deterministic
    algorithms are asked for (``train(deterministic=True)``); otherwise SDPA. An explicit
    ``"varlen"`` or ``"flash"`` that cannot run is an error that says why.
    """
    if requested == "sdpa":
        return "sdpa"
    if requested == "auto":
        # training under deterministic algorithms keeps SDPA, whose kernels torch makes deterministic
        if not _half_precision(x) or (
            torch.are_deterministic_algorithms_enabled() and torch.is_grad_enabled()
        ):
            return "sdpa"
        for backend in ("flash", "varlen"):
            if attention_unusable(backend, x, head_dim) is None:
                return backend
        return "sdpa"
    check_attention(requested)
    reason = attention_unusable(requested, x, head_dim)
    if reason is not None:
        raise RuntimeError(
            f"attention={requested!r} cannot run: {reason}; set attention='auto' (falls back to SDPA) "
            "or 'sdpa' (model.attention = 'sdpa')"
        )
    return requested


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
        if positive_int(d_model, "d_model") % positive_int(n_heads, "n_heads"):
            raise ValueError(f"n_heads must divide d_model, got d_model={d_model}, n_heads={n_heads}")
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

    def forward_packed(self, x: torch.Tensor, packed: PackedTokens, kernel: VarlenKernel) -> torch.Tensor:
        """Attend in the packed layout: ``x`` ``(total, d)``; only the key rows are attended."""
        total, d = x.shape
        q, k, v = self.qkv(x).view(total, 3, self.n_heads, d // self.n_heads).unbind(1)
        out = kernel(q, k[packed.key_rows], v[packed.key_rows], packed)
        return self.out(out.reshape(total, d))

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

    def forward_packed(self, x: torch.Tensor, packed: PackedTokens, kernel: VarlenKernel) -> torch.Tensor:
        """Apply the block to packed tokens ``(total, d)`` (see :class:`PackedTokens`)."""
        x = x + self.dropout(self.attention.forward_packed(self.norm_attention(x), packed, kernel))
        return x + self.dropout(self.mlp(self.norm_mlp(x)))

    def decode(
        self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor
    ) -> torch.Tensor:
        """Apply the block to query tokens ``x`` that attend to given keys and values only."""
        x = x + self.dropout(self.attention.attend(self.norm_attention(x), keys, values, key_mask))
        return x + self.dropout(self.mlp(self.norm_mlp(x)))
