"""ELASTIC — linear dispatcher attention over interest experts, with product-key memory.

Jiaxin Deng, Shiyao Wang, Song Lu, Yinfeng Li, Xinchen Luo, Yuanjun Liu, Peixing Xu,
Guorui Zhou. "ELASTIC: Efficient Linear Attention for SequenTial Interest Compression",
arXiv:2408.09380, 2024 (withdrawn by its authors in 2025 "due to incomplete experiments";
no code, no numbers: compared only with our own SASRec on the same split).

Each block replaces self-attention by **Linear Dispatcher Attention** (LDA) with ``experts``
= k learnable interest-expert tokens (``../shared/reference/seed_baselines.md`` section 7):

1. *dispatch*: the experts attend over the sequence, compressing it into k tokens,
   ``O(N k d)``;
2. the k tokens interact by self-attention, ``O(k^2 d)``;
3. *distribute*: every position attends over the k tokens, ``O(N k d)``.

**Interest Memory Retrieval** (``memory`` = n sub-keys, 0 = off): a bank of ``n^2`` interest
slots indexed by product keys (Lample et al., NeurIPS 2019): a query from the position's
state is split in two halves, each scored against ``n`` sub-keys, the top ``memory-top``
of each half are combined and the best ``memory-top`` pairs retrieved; the retrieved slots,
weighted by the softmax of their scores, join the k experts as extra interest tokens. The
bank grows as ``n^2`` at a cost of ``O(n)`` per position.

Choices where the paper is silent (documented):

* **Causal dispatch.** A next-item model must not let position t see items after t. Each
  position's experts therefore summarise its own prefix: the dispatch weights of expert e
  are ``a_{t,e} = exp(softcap(<q_e, k_t>))`` and the compressed token at t is
  ``sum_{j<=t} a_{j,e} v_j / sum_{j<=t} a_{j,e}``, computed with cumulative sums in
  ``O(N k d)`` (the expert queries do not depend on t, so no running maximum is needed:
  the scores are soft-capped to ``+-cap`` and ``exp(s - cap)`` never overflows). Steps 2
  and 3 then run per position over its own ``k (+ memory-top)`` tokens.
* The memory query is the position's (normalised) state before the block; retrieved slots
  are values only (no keys of their own).
* A single user vector per position (``interests = 1``); SASRec-like learned positions and
  the in-batch softmax of :mod:`fedrec.models.retrieval` (default), or the full softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.base import ModelData
from fedrec.models.layers import PositionwiseFFN, mask_dropout
from fedrec.models.retrieval import RetrievalConfig, RetrievalModel

__all__ = ["ElasticConfig", "Elastic", "ProductKeyMemory", "LinearDispatcherAttention"]


@dataclass
class ElasticConfig(RetrievalConfig):
    """ELASTIC's options (module docstring)."""

    experts: int = 8
    #: sub-keys per half of the product-key memory (n^2 slots); 0 = no interest memory
    memory: int = 16
    memory_top: int = 4
    #: dispatch scores are soft-capped to +-cap
    cap: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.interests != 1:
            raise ConfigError("model option 'interests': ELASTIC gives one user vector per position (use 1)")
        if not isinstance(self.experts, int) or self.experts < 1:
            raise ConfigError(f"model option 'experts' must be a positive integer (got {self.experts!r})")
        if not isinstance(self.memory, int) or self.memory < 0:
            raise ConfigError(f"model option 'memory' must be a non-negative integer (got {self.memory!r})")
        if self.memory and not 1 <= self.memory_top <= self.memory:
            raise ConfigError(f"model option 'memory-top' must be in [1, memory = {self.memory}] (got {self.memory_top})")
        if not self.cap > 0:
            raise ConfigError(f"model option 'cap' must be positive (got {self.cap})")


class ProductKeyMemory(nn.Module):
    """Product-key memory: ``(..., dim)`` queries -> ``(..., top, dim)`` retrieved slot values
    weighted by the softmax of their scores (module docstring)."""

    def __init__(self, dim: int, n_sub: int, top: int) -> None:
        super().__init__()
        self.n_sub, self.top, self.half = n_sub, top, max(1, dim // 2)
        self.query = nn.Linear(dim, 2 * self.half)
        self.keys1 = nn.Linear(self.half, n_sub, bias=False)  # rows = sub-keys
        self.keys2 = nn.Linear(self.half, n_sub, bias=False)
        self.values = nn.Embedding(n_sub * n_sub, dim)
        nn.init.normal_(self.values.weight, 0.0, dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """See the class docstring."""
        q1, q2 = self.query(x).split(self.half, dim=-1)
        s1, i1 = self.keys1(q1).topk(self.top, dim=-1)  # (..., m)
        s2, i2 = self.keys2(q2).topk(self.top, dim=-1)
        pair = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (..., m * m)
        idx = (i1.unsqueeze(-1) * self.n_sub + i2.unsqueeze(-2)).flatten(-2)
        score, pos = pair.topk(self.top, dim=-1)
        slots = idx.gather(-1, pos)  # (..., m)
        weight = torch.softmax(score, dim=-1).unsqueeze(-1)
        return self.values(slots) * weight * self.top


class LinearDispatcherAttention(nn.Module):
    """Causal LDA over ``(B, T, dim)`` (module docstring); ``extra`` ``(B, T, m, dim)``
    tokens (the retrieved memory) join each position's experts."""

    def __init__(self, dim: int, heads: int, experts: int, dropout: float, cap: float) -> None:
        super().__init__()
        self.dim, self.heads, self.cap, self.dropout = dim, heads, cap, dropout
        self.experts = nn.Embedding(experts, dim)
        nn.init.normal_(self.experts.weight, 0.0, dim**-0.5)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.mix_q = nn.Linear(dim, dim)
        self.mix_k = nn.Linear(dim, dim)
        self.mix_v = nn.Linear(dim, dim)
        self.dist_q = nn.Linear(dim, dim)
        self.dist_k = nn.Linear(dim, dim)
        self.dist_v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], self.heads, self.dim // self.heads)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(B, T, dim)``, ``keep`` ``(B, T, 1)`` (0 at padding) -> ``(B, T, dim)``."""
        d = self.dim // self.heads
        # 1. dispatch: expert e at position t summarises positions <= t
        k = self._heads(self.key(x))  # (B, T, h, d)
        v = self._heads(self.value(x))
        e = self._heads(self.experts.weight)  # (k, h, d)
        s = torch.einsum("bthd,ehd->bteh", k, e) / math.sqrt(d)  # (B, T, k, h)
        s = self.cap * torch.tanh(s / self.cap)
        a = torch.exp(s - self.cap) * keep.unsqueeze(-1)  # padding dispatches nothing
        num = torch.cumsum(a.unsqueeze(-1) * v.unsqueeze(2), dim=1)  # (B, T, k, h, d)
        den = torch.cumsum(a, dim=1).unsqueeze(-1)
        tokens = (num / den.clamp(min=1e-30)).flatten(-2)  # (B, T, k, dim)
        if extra is not None:
            tokens = torch.cat([tokens, extra], dim=2)  # (B, T, k + m, dim)
        # 2. the position's tokens interact
        q2, k2, v2 = (self._heads(f(tokens)) for f in (self.mix_q, self.mix_k, self.mix_v))  # (B, T, n, h, d)
        w = torch.softmax(torch.einsum("btihd,btjhd->bthij", q2, k2) / math.sqrt(d), dim=-1)
        w = mask_dropout(w, self.dropout, self.training)
        tokens = tokens + torch.einsum("bthij,btjhd->btihd", w, v2).flatten(-2)
        # 3. distribute: the position attends over its tokens
        q3 = self._heads(self.dist_q(x))  # (B, T, h, d)
        k3, v3 = self._heads(self.dist_k(tokens)), self._heads(self.dist_v(tokens))  # (B, T, n, h, d)
        w = torch.softmax(torch.einsum("bthd,btnhd->bthn", q3, k3) / math.sqrt(d), dim=-1)
        w = mask_dropout(w, self.dropout, self.training)
        return self.out(torch.einsum("bthn,btnhd->bthd", w, v3).flatten(-2))


class _Block(nn.Module):
    def __init__(self, cfg: ElasticConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.lda = LinearDispatcherAttention(cfg.dim, cfg.heads, cfg.experts, cfg.dropout, cfg.cap)
        self.memory = ProductKeyMemory(cfg.dim, cfg.memory, cfg.memory_top) if cfg.memory else None
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.ffn = PositionwiseFFN(cfg.dim, cfg.dim, dropout=cfg.dropout)

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        z = self.norm1(h)
        extra = self.memory(z) if self.memory is not None else None
        h = (h + self.lda(z, keep, extra)) * keep
        z = self.norm2(h)
        return (h + self.ffn(z)) * keep


class Elastic(RetrievalModel):
    """ELASTIC (module docstring)."""

    def __init__(self, data: ModelData, cfg: ElasticConfig) -> None:
        super().__init__(data, cfg)
        self.positions = nn.Embedding(cfg.max_len, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.dim)

    def user_vectors(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """One user vector per position: ``(B, T, 1, d)``."""
        items = batch["items"]
        B, T = items.shape
        keep = (items != 0).unsqueeze(-1).to(torch.get_default_dtype())
        pos = torch.arange(self.cfg.max_len - T, self.cfg.max_len, device=items.device)
        h = self.items(items, batch.get("item_maps")) * math.sqrt(self.cfg.dim) + self.positions(pos).unsqueeze(0)
        h = self.drop(h) * keep
        for block in self.blocks:
            h = block(h, keep)
        return self.final_norm(h).unsqueeze(2), None, {}

    def serving_vectors(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The last position's vector ``(B, 1, d)`` (the prefix computation is causal, so
        the whole sequence is encoded once)."""
        return self.user_vectors(batch)[0][:, -1]

