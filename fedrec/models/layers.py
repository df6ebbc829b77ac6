"""Shared Transformer building blocks, written to run under Opacus (DP-SGD).

* :class:`SelfAttention` — multi-head self-attention from ``nn.Linear`` projections and
  ``torch.nn.functional.scaled_dot_product_attention``, causal (SASRec, Kang & McAuley,
  ICDM 2018) or bidirectional (BERT4Rec, Sun et al., CIKM 2019), with a key-padding mask.
* :class:`PositionwiseFFN` — the position-wise two-layer feed-forward network
  (Vaswani et al., NeurIPS 2017).

Why not ``nn.MultiheadAttention``: Opacus refuses it and its replacement
``DPMultiheadAttention`` computes wrong outputs with ``batch_first=True`` in Opacus 1.6.
Here every trainable parameter sits in an ``nn.Linear`` (or ``nn.LayerNorm``), for which
Opacus has exact per-sample gradient samplers, and no module owns buffers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SelfAttention", "PositionwiseFFN", "attention_mask", "MaskDropout", "mask_dropout"]


def mask_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout written as ``x * (rand >= p) / (1 - p)``: the same distribution as
    ``F.dropout``, but batched efficiently by ``torch.func.vmap`` (whose fallback for the
    fused dropout kernel loops over the batch)."""
    if not training or p == 0.0:
        return x
    return x * (torch.rand_like(x) >= p).to(x.dtype) / (1.0 - p)


class MaskDropout(nn.Module):
    """:func:`mask_dropout` as a module (drop-in for ``nn.Dropout`` under vmap)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Drop elements of ``x`` with probability ``p`` (training only)."""
        return mask_dropout(x, self.p, self.training)


def attention_mask(padding: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """Boolean ``(B, 1, T, T)`` mask, True where a query may attend to a key.

    ``padding`` is ``(B, T)``, True at padded positions. Keys at padded positions are masked
    out; with ``causal`` so are future keys. Every query may always attend to itself, so a
    row is never fully masked (which would give NaN); outputs at padded positions are
    meaningless and must be zeroed or ignored by the caller.
    """
    _, T = padding.shape
    allowed = ~padding[:, None, None, :]  # (B, 1, 1, T) keys
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=padding.device).tril()
    return allowed | torch.eye(T, dtype=torch.bool, device=padding.device)


class SelfAttention(nn.Module):
    """Multi-head self-attention over ``(B, T, dim)`` inputs.

    Parameters
    ----------
    dim:
        Model width (divisible by ``heads``).
    heads:
        Number of attention heads.
    dropout:
        Dropout on the attention weights (training only).
    causal:
        True for left-to-right attention (SASRec); False for bidirectional (BERT4Rec).
    """

    def __init__(self, dim: int, heads: int = 1, *, dropout: float = 0.0, causal: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1) (got {dropout})")
        self.dim, self.heads, self.dropout, self.causal = dim, heads, dropout, causal
        #: compute attention with explicit matmul/softmax instead of the fused kernel (the
        #: federated engine sets it on its working copy; same result)
        self.explicit = False
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, padding: torch.Tensor, *, query: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend ``query`` (default ``x``) over ``x``; ``padding`` is ``(B, T)``, True = pad.

        ``mask`` (boolean, broadcastable to ``(B, 1, T, T)``, True = may attend) replaces the
        mask built from ``padding`` and ``causal`` (e.g. KuaiFormer's query tokens, each group
        of which sees its own prefix); it must let every query attend to at least one key.
        Returns ``(B, T, dim)``.
        """
        B, T, _ = x.shape
        q_in = x if query is None else query
        h, d = self.heads, self.dim // self.heads
        # (B, T, dim) -> (B, heads, T, d)
        q = self.query(q_in).view(B, T, h, d).transpose(1, 2)
        k = self.key(x).view(B, T, h, d).transpose(1, 2)
        v = self.value(x).view(B, T, h, d).transpose(1, 2)
        if mask is None:
            mask = attention_mask(padding, causal=self.causal)
        if self.explicit:
            # the same computation in plain ops: torch.func.vmap has batching rules for
            # these, not for the fused CPU attention kernel
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)
            weights = mask_dropout(torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1),
                                   self.dropout, self.training)
            ctx = weights @ v
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(ctx.transpose(1, 2).reshape(B, T, self.dim))


class PositionwiseFFN(nn.Module):
    """``Linear(dim, hidden) -> activation -> dropout -> Linear(hidden, dim)`` per position.

    Parameters
    ----------
    dim, hidden:
        Input/output width and hidden width.
    dropout:
        Dropout after the activation and on the output (training only).
    activation:
        ``"relu"`` (SASRec) or ``"gelu"`` (BERT4Rec).
    """

    def __init__(self, dim: int, hidden: int, *, dropout: float = 0.0, activation: str = "relu") -> None:
        super().__init__()
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be relu or gelu (got {activation!r})")
        self.inner = nn.Linear(dim, hidden)
        self.outer = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., dim) -> (..., dim)``."""
        act = F.relu if self.activation == "relu" else F.gelu
        return self.drop(self.outer(self.drop(act(self.inner(x)))))
