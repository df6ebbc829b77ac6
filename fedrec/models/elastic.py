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

* **Causal, chunked dispatch.** A next-item model must not let position t see items after
  t, and a per-position summary would repeat steps 2 and 3 for every position. The sequence
  is cut into chunks of ``chunk`` positions (16): the experts' tokens of a chunk summarise
  every item *before* the chunk (dispatch weights ``a_{j,e} = exp(softcap(<q_e, k_j>))``,
  summed per chunk and accumulated over chunks: ``O(N k d)``; the scores are soft-capped to
  ``+-cap`` so ``exp(s - cap)`` never overflows and no running maximum is needed); the
  chunk's k tokens interact once (step 2, ``O(N/chunk k^2 d)``); and each position
  attends over its chunk's k tokens, its retrieved memory slots and the earlier positions of
  its own chunk (step 3, ``O(N (k + m + chunk) d)``). Linear in N for a fixed chunk.
* The memory query is the position's (normalised) state before the block; retrieved slots
  are values only, and join the position's keys in step 3 (not the experts' interaction,
  which runs once per chunk).
* A single user vector per position (``interests = 1``); SASRec-like learned positions and
  the in-batch softmax of :mod:`fedrec.models.retrieval` (default), or the full softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
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
    #: positions per chunk: a chunk's experts summarise everything before it
    chunk: int = 16

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
        if not isinstance(self.chunk, int) or self.chunk < 1:
            raise ConfigError(f"model option 'chunk' must be a positive integer (got {self.chunk!r})")
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
    """Causal, chunked LDA over ``(B, T, dim)`` (module docstring); ``extra`` ``(B, T, m,
    dim)`` tokens (the retrieved memory) join each position's keys."""

    def __init__(self, dim: int, heads: int, experts: int, dropout: float, cap: float, chunk: int) -> None:
        super().__init__()
        self.dim, self.heads, self.cap, self.dropout, self.chunk = dim, heads, cap, dropout, chunk
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
        B, T, D = x.shape
        c, h, d = self.chunk, self.heads, self.dim // self.heads
        pad = (-T) % c  # left-pad to whole chunks (the sequences are left-padded already)
        if pad:
            x = F.pad(x, (0, 0, pad, 0))
            keep = F.pad(keep, (0, 0, pad, 0))
            if extra is not None:
                extra = F.pad(extra, (0, 0, 0, 0, pad, 0))
        n = (T + pad) // c
        neg = torch.finfo(x.dtype).min
        # 1. dispatch: the experts summarise every chunk; chunk i's tokens are the sums over
        # chunks before it (exclusive prefix), normalised
        k = self._heads(self.key(x)).view(B, n, c, h, d)
        v = self._heads(self.value(x)).view(B, n, c, h, d)
        e = self._heads(self.experts.weight)  # (E, h, d)
        s = torch.einsum("bnchd,ehd->bnceh", k, e) / math.sqrt(d)
        s = self.cap * torch.tanh(s / self.cap)
        a = torch.exp(s - self.cap) * keep.view(B, n, c, 1, 1)  # padding dispatches nothing
        num = torch.einsum("bnceh,bnchd->bnehd", a, v)  # (B, n, E, h, d)
        den = a.sum(2)  # (B, n, E, h)
        num = torch.cumsum(num, 1) - num
        den = torch.cumsum(den, 1) - den
        valid = den[..., 0] > 0  # (B, n, E): the chunk has a real item before it
        tokens = (num / den.clamp(min=1e-30).unsqueeze(-1)).flatten(-2)  # (B, n, E, dim)
        # 2. the chunk's expert tokens interact
        q2, k2, v2 = (self._heads(f(tokens)) for f in (self.mix_q, self.mix_k, self.mix_v))  # (B, n, E, h, d)
        sc = torch.einsum("bnihd,bnjhd->bnhij", q2, k2) / math.sqrt(d)
        sc = sc.masked_fill(~valid[:, :, None, None, :], neg)
        w = mask_dropout(torch.softmax(sc, dim=-1), self.dropout, self.training)
        mixed = torch.einsum("bnhij,bnjhd->bnihd", w, v2).flatten(-2)
        tokens = tokens + mixed * valid.unsqueeze(-1).to(x.dtype)
        # 3. distribute: each position attends over its chunk's expert tokens, its own
        # retrieved memory slots and the earlier positions of its chunk
        q3 = self._heads(self.dist_q(x)).view(B, n, c, h, d)
        kt, vt = self._heads(self.dist_k(tokens)), self._heads(self.dist_v(tokens))  # (B, n, E, h, d)
        kl = self._heads(self.dist_k(x)).view(B, n, c, h, d)
        vl = self._heads(self.dist_v(x)).view(B, n, c, h, d)
        s_tok = torch.einsum("bnchd,bnehd->bnche", q3, kt).masked_fill(~valid[:, :, None, None, :], neg)
        local = torch.ones(c, c, dtype=torch.bool, device=x.device).tril()[None, None, :, None, :]
        local = (local & (keep.view(B, n, 1, 1, c) > 0)) | torch.eye(c, dtype=torch.bool, device=x.device)[None, None, :, None, :]
        s_loc = torch.einsum("bnchd,bnjhd->bnchj", q3, kl).masked_fill(~local, neg)
        parts = [s_tok, s_loc]
        if extra is not None:
            m = extra.shape[2]
            km = self._heads(self.dist_k(extra)).view(B, n, c, m, h, d)
            vm = self._heads(self.dist_v(extra)).view(B, n, c, m, h, d)
            parts.append(torch.einsum("bnchd,bncmhd->bnchm", q3, km))
        w = torch.softmax(torch.cat(parts, dim=-1) / math.sqrt(d), dim=-1)
        w = mask_dropout(w, self.dropout, self.training)
        E = kt.shape[2]
        ctx = torch.einsum("bnche,bnehd->bnchd", w[..., :E], vt) + torch.einsum("bnchj,bnjhd->bnchd", w[..., E:E + c], vl)
        if extra is not None:
            ctx = ctx + torch.einsum("bnchm,bncmhd->bnchd", w[..., E + c:], vm)
        return self.out(ctx.reshape(B, n * c, D)[:, pad:])


class _Block(nn.Module):
    def __init__(self, cfg: ElasticConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.lda = LinearDispatcherAttention(cfg.dim, cfg.heads, cfg.experts, cfg.dropout, cfg.cap, cfg.chunk)
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

