"""KuaiFormer — Transformer-based retrieval with multi-interest query tokens.

Chi Liu, Jiangxia Cao, Rui Huang, Kai Zheng, Qiang Luo, Kun Gai, Guorui Zhou.
"KuaiFormer: Transformer-Based Retrieval at Kuaishou", arXiv:2411.10057, 2024.

What is kept from the paper (``../shared/reference/seed_baselines.md`` section 3):

* **Tokens** ``t_i = MLP(item_i)``: the item representation (id and/or attribute
  embeddings, :class:`~fedrec.models.backbone.ItemEncoder`; the paper's side attributes are
  the item attributes where the data has them) through a two-layer MLP, plus a learned
  position of the raw region.
* **Backbone**: a Llama-style causal Transformer: RMSNorm pre-norm, masked multi-head
  self-attention, SwiGLU feed-forward, ``layers`` blocks.
* **Multi-interest query tokens**: ``interests`` = k learnable query tokens appended after
  the sequence; under the causal mask later queries see earlier ones; their outputs are the
  user's k interests, and an item's score is ``max_j <x, u_j>``.
* **Loss**: in-batch softmax with logQ correction and label smoothing
  (:mod:`fedrec.models.retrieval`; paper defaults ``softmax = in-batch``, ``logq = true``).
* **Adaptive compression of early history** (``windows``): the oldest ``sum(windows)``
  positions of the ``max-len`` frame are cut, oldest first, into windows of the given sizes
  (the paper: 64, 64, 16 x 5 for 256 items, the last 48 raw; e.g. ``"16,16,4,4"`` for 50);
  each window is encoded by a one-layer *bidirectional* Transformer and mean-pooled over its
  real items into one token. The newest ``max-len - sum(windows)`` items stay raw.

Choices where the paper is silent (documented, ablatable):

* **Training on every prefix at once.** The paper predicts the next item after the whole
  sequence. To train on every position of a window, as SASRec does, the k query tokens are
  placed after *every* raw position in one pass, each group with a block mask that lets it
  see the compressed windows, the raw items up to its cut and the earlier queries of its own
  group: exactly the attention of appending the k queries to that prefix. ``train-cuts``
  (0 = all) keeps only the newest cuts, to bound the cost. Targets inside the compressed
  region are not trained (their prefix is compressed away).
* Compressed tokens see each other causally (older windows before newer); every raw token
  and query sees all of them.
* The queries get no position embedding (they are the same k tokens after every prefix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.base import ModelData
from fedrec.models.layers import PositionwiseFFN, SelfAttention
from fedrec.models.retrieval import RetrievalConfig, RetrievalModel, SwiGLU

__all__ = ["KuaiFormerConfig", "KuaiFormer", "parse_windows"]


def parse_windows(spec: str) -> tuple[int, ...]:
    """``"64,64,16"`` -> ``(64, 64, 16)`` (oldest window first); ``""`` -> ``()``."""
    spec = str(spec).strip()
    if not spec or spec.lower() == "none":
        return ()
    try:
        sizes = tuple(int(s) for s in spec.split(","))
    except ValueError:
        raise ConfigError(f"model option 'windows' must be comma-separated window sizes, e.g. 16,16,4 (got {spec!r})") from None
    if any(s < 1 for s in sizes):
        raise ConfigError(f"model option 'windows': every window size must be positive (got {spec!r})")
    return sizes


@dataclass
class KuaiFormerConfig(RetrievalConfig):
    """KuaiFormer's options (module docstring); ``interests`` is the number of query tokens."""

    interests: int = 4
    label_smoothing: float = 0.1
    #: early-history windows, oldest first, e.g. "16,16,4,4" ("" = no compression)
    windows: str = ""
    #: newest prefixes trained per sequence (0 = every raw position)
    train_cuts: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        sizes = parse_windows(self.windows)
        if sum(sizes) >= self.max_len:
            raise ConfigError(f"model option 'windows' ({self.windows}) must leave raw positions: its sizes sum to "
                              f"{sum(sizes)} and max-len is {self.max_len}")
        if not isinstance(self.train_cuts, int) or self.train_cuts < 0:
            raise ConfigError(f"model option 'train-cuts' must be a non-negative integer (got {self.train_cuts!r})")


class _Block(nn.Module):
    """RMSNorm pre-norm attention (mask given) + SwiGLU feed-forward."""

    def __init__(self, cfg: KuaiFormerConfig, *, swiglu: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.dim)
        self.attn = SelfAttention(cfg.dim, cfg.heads, dropout=cfg.dropout, causal=True)
        self.norm2 = nn.RMSNorm(cfg.dim)
        self.ffn = SwiGLU(cfg.dim, 2 * cfg.dim, cfg.dropout) if swiglu else PositionwiseFFN(cfg.dim, cfg.dim, dropout=cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, S, dim)`` -> ``(B, S, dim)``."""
        x = x + self.drop(self.attn(self.norm1(x), padding, mask=mask))
        return x + self.ffn(self.norm2(x))


class KuaiFormer(RetrievalModel):
    """KuaiFormer (module docstring)."""

    def __init__(self, data: ModelData, cfg: KuaiFormerConfig) -> None:
        super().__init__(data, cfg)
        d = cfg.dim
        self.windows = parse_windows(cfg.windows)
        self.n_compressed = sum(self.windows)
        self.raw_len = cfg.max_len - self.n_compressed
        self.token_mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.positions = nn.Embedding(self.raw_len, d)
        self.queries = nn.Embedding(cfg.interests, d)
        nn.init.normal_(self.queries.weight, 0.0, d**-0.5)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.final_norm = nn.RMSNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        if self.windows:
            self.window_positions = nn.Embedding(len(self.windows), d)
            self.compressor = _Block(cfg, swiglu=False)

    # -- compression ------------------------------------------------------------------
    def _compress(self, tokens: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, W, d)`` tokens of the compressed region -> ``(B, n_windows, d)`` window
        tokens and their padding ``(B, n_windows)`` (True: the window holds no real item)."""
        B = tokens.shape[0]
        out, pads = [], []
        start = 0
        # runs of equal-size windows are encoded together as (B * n, size) sequences
        run_start = 0
        while run_start < len(self.windows):
            size = self.windows[run_start]
            run_end = run_start
            while run_end < len(self.windows) and self.windows[run_end] == size:
                run_end += 1
            n = run_end - run_start
            x = tokens[:, start:start + n * size].reshape(B * n, size, -1)
            pad = (items[:, start:start + n * size] == 0).reshape(B * n, size)
            mask = (~pad)[:, None, None, :] | torch.eye(size, dtype=torch.bool, device=x.device)
            h = self.compressor(x, pad, mask)
            keep = (~pad).unsqueeze(-1).to(h.dtype)
            pooled = (h * keep).sum(1) / keep.sum(1).clamp(min=1.0)
            out.append(pooled.reshape(B, n, -1))
            pads.append(pad.all(-1).reshape(B, n))
            start += n * size
            run_start = run_end
        return torch.cat(out, dim=1), torch.cat(pads, dim=1)

    # -- the model --------------------------------------------------------------------
    def user_vectors(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """The k interests after every raw prefix (see the module docstring)."""
        cfg = self.cfg
        items = batch["items"]
        B, T = items.shape
        L, W, R, k = cfg.max_len, self.n_compressed, self.raw_len, cfg.interests
        frame = torch.nn.functional.pad(items, (L - T, 0)) if T < L else items  # left-padded to max-len
        maps = batch.get("item_maps")
        x = self.items(frame, maps)
        tokens = (x + self.token_mlp(x)) * math.sqrt(cfg.dim)
        raw_items = frame[:, W:]
        raw = tokens[:, W:] + self.positions.weight.unsqueeze(0)
        # queries after every raw prefix in training (the newest train-cuts of them), after
        # the last one at serving: always the newest C raw positions
        C = 1 if batch.get("last_only") else (min(cfg.train_cuts, R) if cfg.train_cuts else R)
        cuts = torch.arange(R - C, R, device=items.device)
        parts, pads = [], []
        n_win = 0
        if self.windows:
            win, win_pad = self._compress(tokens[:, :W], frame[:, :W])
            n_win = win.shape[1]
            parts.append(win + self.window_positions.weight.unsqueeze(0))
            pads.append(win_pad)
        parts.append(raw)
        pads.append(raw_items == 0)
        parts.append(self.queries.weight.repeat(C, 1).unsqueeze(0).expand(B, -1, -1))
        pads.append(torch.zeros(B, C * k, dtype=torch.bool, device=items.device))
        h = self.drop(torch.cat(parts, dim=1))
        padding = torch.cat(pads, dim=1)  # (B, S)
        mask = self._mask(n_win, R, cuts, k, padding)
        for block in self.blocks:
            h = block(h, padding, mask)
        h = self.final_norm(h)
        q = h[:, n_win + R:].reshape(B, C, k, -1)  # (B, C, k, d): cut c is frame position W + c
        reps = torch.cat([q.new_zeros(B, L - C, k, q.shape[-1]), q], dim=1)[:, L - T:]
        trainable = (torch.arange(L, device=items.device) >= L - C)[L - T:]
        return reps, trainable.expand(B, T), {}

    @staticmethod
    def _mask(n_win: int, R: int, cuts: torch.Tensor, k: int, padding: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S, S)`` attention mask of the layout [windows | raw | C groups of k
        queries] (module docstring); True = may attend."""
        device = padding.device
        C = cuts.numel()
        S = n_win + R + C * k
        # a "time" per token: windows before every raw position; raw position r at r; the
        # queries of cut c at c; a key is visible when its time is <= the query's time
        kind = torch.cat([torch.zeros(n_win, dtype=torch.long), torch.ones(R, dtype=torch.long),
                          torch.full((C * k,), 2, dtype=torch.long)]).to(device)
        time = torch.cat([torch.arange(n_win, device=device) - n_win, torch.arange(R, device=device),
                          cuts.repeat_interleave(k)])
        group = torch.cat([torch.full((n_win + R,), -1, device=device), torch.arange(C, device=device).repeat_interleave(k)])
        slot = torch.cat([torch.zeros(n_win + R, dtype=torch.long, device=device), torch.arange(k, device=device).repeat(C)])
        earlier = time[:, None] >= time[None, :]  # (S, S): key not later than query
        key_is_query = (kind == 2)[None, :]
        same_group_earlier = (group[:, None] == group[None, :]) & (slot[:, None] >= slot[None, :])
        allowed = torch.where(key_is_query, same_group_earlier, earlier)
        allowed = allowed[None, None] & ~padding[:, None, None, :]
        return allowed | torch.eye(S, dtype=torch.bool, device=device)
