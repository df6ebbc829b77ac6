"""MARM — multi-layer target attention whose lower layers are cached per (user, item, layer).

Xiao Lv, Jiangxia Cao, Shijie Guan, Xiaoyou Zhou, Zhiguang Qi, Yaqiang Zang, Ming Li, Ben
Wang, Kun Gai, Guorui Zhou. "MARM: Unlocking the Future of Recommendation Systems through
Memory Augmentation and Scalable Complexity", arXiv:2411.09425, 2024.

In recommendation FLOPs, not parameters, are scarce; storage is cheap. MARM trades one for
the other (``../shared/reference/seed_baselines.md`` section 4). One layer of *target
attention* (TA: the candidate attends over the user's exposure sequence) costs O(n·d) per
candidate. MARM stacks L of them: when item ``v`` is scored for user ``u``,

* layer 1: ``z1_v = TA(e_v, {e_s : s in history})``;
* layer l: ``zl_v = TA(z(l-1)_v, {cache[u, s, l-1] : s in history})``: the history items'
  layer-(l-1) outputs are *looked up*, not recomputed: they were computed, and stored, when
  each ``s`` was itself the scored item of an earlier request;
* after scoring, ``z1_v .. z(L-1)_v`` are written to ``cache[u, v, ·]``.

So an L-layer model, which approximates L layers of masked self-attention over the
sequence at ``O(L·n²·d)``, costs ``O(L·n·d)`` per candidate; cached values carry no gradient
(stop-gradient through the cache) and are as stale as the request that wrote them.

How it is trained and served here (choices where the paper is silent, documented):

* **Training** runs on each user's window of impressions, every position a request: the
  query of position t is its target ``y_t`` (the next impression), its history the window's
  items up to t, each history token carrying its own click label. The history item ``x_s``
  was the target of position ``s - 1``, so its cached layer-l value is that position's
  output, detached (``cache = true``): exactly what a cache written by the earlier request
  would hold, without a dictionary round trip inside a batch. The window's first item was
  never a target in the window: it is read from the **cache store** (written by earlier
  batches and epochs), or, on a miss, stands in with its lower layer's value.
* **Serving** (validation, test, ``fedrec recommend``) reads the history's layer values
  from the cache store only (one lookup per history item and layer): ``O(L·n·d)`` per
  candidate. Every (user, item) scored in training is in the store with the values of its
  latest training step; a history item never scored in training (the validation item in
  the test history) is a miss and stands in with its lower layer's value. Serving writes
  nothing, so evaluation is repeatable. :meth:`MARM.cache_report` gives the store's entries,
  bytes and the hit rate of the lookups since the last reset.
* ``cache = false``: the same L layers with the history's values recomputed in every
  request and trained through (no stop-gradient): the uncached model whose cost MARM avoids.
* ``layers = 1`` is DIN-style target attention (no cache needed).
* The cache store is part of the model's state (``state_dict``'s extra state), so a saved
  model serves as the trained one did. Under the federated engine (one user per vmap slice)
  the store is not used: serving then computes the history's values in the window, as
  ``cache = false`` does but with the stop-gradient.
* Head: ``MLP([z_L ; e_v ; e_u]) -> click logit`` (e_u: the user profile), BCE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.backbone import ItemEncoder, UserEncoder, check_widths
from fedrec.models.base import PUBLIC, ModelData, ParamRole, RecModel

__all__ = ["MARMConfig", "MARM", "TargetAttention", "flops_per_request"]


@dataclass
class MARMConfig:
    """MARM's options (module docstring)."""

    dim: int = 32
    field_dim: int = 8
    #: target-attention layers L (L - 1 of them cached)
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    #: the most recent impressions read (65: the backbone's, MRFF's reference)
    max_len: int = 65
    item_repr: str = "auto"
    user_profile: bool = True
    user_id: bool = False
    #: read the history's lower layers from the cache (stop-gradient); false = recompute
    cache: bool = True
    ctr_hidden: int = 64
    task: str = "ctr"

    def __post_init__(self) -> None:
        check_widths(self, ("dim", "field_dim", "layers", "heads", "max_len", "ctr_hidden"))
        if self.task != "ctr":
            raise ConfigError(f"MARM is a ranking model: it supports the ctr task only (got {self.task!r})")


def flops_per_request(n: int, *, layers: int, dim: int, cached: bool) -> int:
    """Multiply-adds of the attention layers to score one candidate after ``n`` history items.

    Per layer, cached: the query projection and output projection (``2 d²``), the key and
    value projections of the ``n`` history values (``2 n d²``), the scores and the weighted
    sum (``2 n d``). Uncached, each of the ``L - 1`` lower layers must first be recomputed
    for every history item over its own prefix: ``n`` queries (``2 n d²`` projections), keys
    and values (``2 n d²``) and about ``n²/2`` scores and weighted sums each (``n² d``).
    The head and embeddings are the same either way and not counted.
    """
    per_layer = 2 * dim * dim + 2 * n * dim * dim + 2 * n * dim
    total = layers * per_layer
    if not cached:
        total += (layers - 1) * (4 * n * dim * dim + n * n * dim)
    return int(total)


class TargetAttention(nn.Module):
    """Multi-head attention of queries ``(B, Q, d)`` over keys/values ``(B, S, d)`` under a
    boolean mask ``(B, Q, S)`` (True = may attend); a query that may attend to nothing gets
    zeros. Plain matmuls (``torch.func.vmap`` has rules for them)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dim = heads, dim
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """See the class docstring."""
        B, Q, _ = q.shape
        S = kv.shape[1]
        h, d = self.heads, self.dim // self.heads
        qh = self.query(q).view(B, Q, h, d).transpose(1, 2)
        kh = self.key(kv).view(B, S, h, d).transpose(1, 2)
        vh = self.value(kv).view(B, S, h, d).transpose(1, 2)
        scores = (qh @ kh.transpose(-2, -1)) / math.sqrt(d)  # (B, h, Q, S)
        m = mask.unsqueeze(1)
        weights = torch.softmax(scores.masked_fill(~m, float("-inf")), dim=-1)
        weights = torch.where(m.any(-1, keepdim=True), weights, torch.zeros_like(weights))
        ctx = self.drop(weights) @ vh
        return self.out(ctx.transpose(1, 2).reshape(B, Q, self.dim))


class _CacheStore:
    """(user, item) -> the item's layer-1..L-1 outputs ``(L - 1, d)``, latest write wins."""

    def __init__(self, width: int, stride: int) -> None:
        self.width, self.stride = width, stride
        self.slot: dict[int, int] = {}
        self.values = torch.zeros(0, width)
        self.lookups = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self.slot)

    def get(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values (..., width), hit (...))`` of the pairs (0 where missing), on the device
        of ``items`` (the store itself lives in host memory, as a serving cache does)."""
        device = items.device
        users, items = users.cpu(), items.cpu()
        users = users.long().reshape(users.shape + (1,) * (items.dim() - users.dim()))  # broadcast over items
        keys = (users * self.stride + items.long()).reshape(-1).tolist()
        rows = [self.slot.get(k, -1) for k in keys]
        idx = torch.tensor(rows, dtype=torch.long).reshape(items.shape)
        hit = idx >= 0
        out = self.values[idx.clamp(min=0)] if len(self.values) else torch.zeros(*items.shape, self.width)
        out = torch.where(hit.unsqueeze(-1), out, torch.zeros_like(out))
        return (out, hit) if device.type == "cpu" else (out.to(device), hit.to(device))

    def put(self, users: torch.Tensor, items: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``values`` ``(N, width)`` for the pairs ``(N,)`` (later rows win)."""
        users, items, values = users.cpu(), items.cpu(), values.detach().cpu()
        keys = (users.long() * self.stride + items.long()).tolist()
        last = {k: j for j, k in enumerate(keys)}  # a pair twice in one call: its later row wins
        new = [k for k in last if k not in self.slot]
        if new:
            start = len(self.values)
            self.values = torch.cat([self.values, torch.zeros(len(new), self.width)])
            self.slot.update({k: start + j for j, k in enumerate(new)})
        rows = torch.tensor([self.slot[k] for k in last], dtype=torch.long)
        self.values[rows] = values.detach().to(self.values.dtype)[torch.tensor(list(last.values()), dtype=torch.long)]

    def state(self) -> dict[str, torch.Tensor]:
        keys = torch.tensor(list(self.slot.keys()), dtype=torch.long)
        rows = torch.tensor(list(self.slot.values()), dtype=torch.long)
        return {"keys": keys, "values": self.values[rows] if len(rows) else self.values[:0]}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        keys = state["keys"].tolist()
        self.slot = {k: j for j, k in enumerate(keys)}
        self.values = state["values"].clone().float()


class MARM(RecModel):
    """MARM (module docstring)."""

    tasks = ("ctr",)
    #: set by the federated engine: no cache store (module docstring)
    vmap_safe: bool = False

    def __init__(self, data: ModelData, cfg: MARMConfig) -> None:
        super().__init__()
        self.cfg, self.data = cfg, data
        d = cfg.dim
        self.items = ItemEncoder(data, cfg)
        self.users = UserEncoder(data, cfg)
        self.labels = nn.Embedding(2, d)
        nn.init.normal_(self.labels.weight, 0.0, d**-0.5)
        self.attention = nn.ModuleList(TargetAttention(d, cfg.heads, cfg.dropout) for _ in range(cfg.layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(cfg.layers))
        self.head = nn.Sequential(nn.Linear(2 * d + self.users.width, cfg.ctr_hidden), nn.ReLU(),
                                  nn.Dropout(cfg.dropout), nn.Linear(cfg.ctr_hidden, 1))
        self.store = _CacheStore((cfg.layers - 1) * d, data.n_items + 1)

    # -- the cache store as part of the state ---------------------------------------------
    def get_extra_state(self) -> dict[str, torch.Tensor]:
        """The cache store (saved with the weights)."""
        return self.store.state()

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the cache store."""
        self.store.load(state)

    def cache_report(self) -> dict[str, Any]:
        """The store's entries, memory (bytes of float32 values) and the hit rate of the
        serving lookups since :meth:`reset_cache_stats`."""
        s = self.store
        return {"entries": len(s), "bytes": int(len(s) * s.width * 4), "lookups": s.lookups, "hits": s.hits,
                "hit_rate": s.hits / s.lookups if s.lookups else None}

    def reset_cache_stats(self) -> None:
        """Zero the lookup counters of :meth:`cache_report`."""
        self.store.lookups = self.store.hits = 0

    @property
    def uses_store(self) -> bool:
        """Whether lower layers are read from the cache store (``cache`` and not federated)."""
        return self.cfg.cache and self.cfg.layers > 1 and not self.vmap_safe

    # -- the layers ---------------------------------------------------------------------
    def _user(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.users(batch["user"], batch.get("user_codes"))

    def _layer(self, l: int, z: torch.Tensor, values: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.norms[l](z + self.attention[l](z, values + label, mask))

    def _window(self, batch: dict[str, torch.Tensor], queries: torch.Tensor,
                layers: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every position a request: ``queries`` ``(B, T)`` (position t's scored item, which
        the history item at t + 1 is), the history's layer values from the earlier
        positions' outputs (module docstring). Returns ``z_1 .. z_L`` and the history values
        each layer read, ``(B, T, d)`` each (only the first ``layers`` of them: what serving
        without the store needs)."""
        items, maps = batch["items"], batch.get("item_maps")
        T = items.shape[1]
        pad = items == 0
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool, device=items.device)).unsqueeze(0) & ~pad.unsqueeze(1)
        label = self.labels(batch["labels"].clamp(0, 1))
        values = self.items(items, maps)  # layer-0 values of the history
        z = self.items(queries, maps)
        # the window's first real item was never a target in it: the store's value, or a
        # stand-in (its lower layer's value); every later item was the previous position's target
        first = ~pad & torch.cat([torch.ones_like(pad[:, :1]), pad[:, :-1]], dim=1)  # (B, T)
        stored = hit = None
        if self.uses_store and self.training:
            stored, hit = self.store.get(batch["user"], items)  # (B, T, width)
            stored = stored.view(*items.shape, self.cfg.layers - 1, self.cfg.dim)
            # an item that is also a later target of this window was stored from a position
            # whose history holds this window's labels: not read (a stand-in instead)
            again = (items.unsqueeze(-1) == batch["target_items"].unsqueeze(1)).any(-1)
            hit = hit & first & ~again
        outs, used = [], []
        n = self.cfg.layers if layers is None else layers
        for l in range(n):
            used.append(values)
            if l == n - 1 and layers is not None:
                break  # the values of the last layer asked for are known: its outputs are not needed
            z = self._layer(l, z, values, label, mask)
            outs.append(z)
            if l < n - 1:
                shifted = torch.cat([values[:, :1], z[:, :-1]], dim=1)
                shifted = torch.where(first.unsqueeze(-1), values, shifted)
                if stored is not None:
                    shifted = torch.where(hit.unsqueeze(-1), stored[:, :, l].to(z.dtype), shifted)
                values = shifted.detach() if self.cfg.cache else shifted
        return outs, used

    def _history_from_store(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Layer 0..L-1 values of the history, read from the store (a miss stands in with its
        lower layer's value); counts the lookups."""
        items = batch["items"]
        values = [self.items(items)]
        if self.cfg.layers > 1:
            cached, hit = self.store.get(batch["user"], items)  # (B, T, width)
            cached = cached.view(*items.shape, self.cfg.layers - 1, self.cfg.dim).to(values[0].dtype)
            real = items != 0
            self.store.lookups += int(real.sum()) * (self.cfg.layers - 1)
            self.store.hits += int((hit & real).sum()) * (self.cfg.layers - 1)
            for l in range(self.cfg.layers - 1):
                values.append(torch.where(hit.unsqueeze(-1), cached[:, :, l], values[-1]))
        return values

    def _serve(self, batch: dict[str, torch.Tensor], candidates: torch.Tensor) -> torch.Tensor:
        """Click logits ``(B, C)`` of ``candidates`` ``(B, C)`` after the whole history."""
        items = batch["items"]
        C = candidates.shape[1]
        label = self.labels(batch["labels"].clamp(0, 1))
        mask = (items != 0).unsqueeze(1).expand(-1, C, -1)
        if self.uses_store:
            values = self._history_from_store(batch)
        else:  # the history's values computed in the window, as in training
            queries = torch.cat([items[:, 1:], torch.zeros_like(items[:, :1])], dim=1)
            _, values = self._window(batch, queries, layers=self.cfg.layers)
        z = self.items(candidates)
        for l in range(self.cfg.layers):
            z = self._layer(l, z, values[l], label, mask)
        u = self._user(batch).unsqueeze(1).expand(-1, C, -1)
        return self.head(torch.cat([z, self.items(candidates), u], dim=-1)).squeeze(-1)

    # -- the model interface ------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor], mode: str = "train") -> Any:
        """``train``: logits ``(B, T)`` of every position's target (and the store written);
        ``loss``: ``(loss, outputs)``; ``ctr``: click probabilities of the last position;
        ``ctr-all``: of every item as the next impression."""
        if mode == "loss":
            out = self.forward(batch)
            return self.loss(batch, out), out
        if mode == "ctr":
            return self.predict_ctr(batch)
        if mode == "ctr-all":
            return self.predict_ctr_candidates(batch, torch.arange(self.data.n_items + 1, device=batch["user"].device))
        if mode != "train":
            raise ValueError(f"unknown forward mode {mode!r}")
        if batch["items"].shape[1] > self.cfg.max_len:
            raise ConfigError(f"sequence length {batch['items'].shape[1]} exceeds the model's max_len {self.cfg.max_len}")
        targets = batch["target_items"]
        outs, _ = self._window(batch, targets)
        z = outs[-1]
        u = self._user(batch).unsqueeze(1).expand(-1, z.shape[1], -1)
        maps = batch.get("item_maps")
        logits = self.head(torch.cat([z, self.items(targets, maps), u], dim=-1)).squeeze(-1)
        if self.uses_store and self.training:
            real = batch["target_mask"]
            if real.any():
                users = batch["user"].unsqueeze(1).expand_as(targets)[real]
                layers = torch.cat([o[real] for o in outs[:-1]], dim=-1)  # (N, (L-1) d)
                self.store.put(users, targets[real], layers)
        return {"logits": logits, "context": {"routing": []}}

    def loss(self, batch: dict[str, torch.Tensor], out: dict[str, Any]) -> torch.Tensor:
        """BCE over the real target positions (masked sums: vmap-safe)."""
        mask = batch["target_mask"].to(out["logits"].dtype)
        bce = F.binary_cross_entropy_with_logits(out["logits"], batch["target_labels"], reduction="none")
        return (bce * mask).sum() / mask.sum().clamp(min=1.0)

    def predict_ctr(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Click probability of the held-out impression after the whole history (served)."""
        return torch.sigmoid(self._serve(batch, batch["target_items"][:, -1:]))[:, 0]

    def predict_ctr_candidates(self, batch: dict[str, torch.Tensor], candidates: torch.Tensor, *,
                               chunk_elements: int = 1 << 22) -> torch.Tensor:
        """``(B, C)`` click probabilities of ``candidates`` (``(C,)`` or ``(B, C)``) as the next
        impression, served as :meth:`predict_ctr` serves the held-out one."""
        B = batch["items"].shape[0]
        cand = candidates.unsqueeze(0).expand(B, -1) if candidates.dim() == 1 else candidates
        step = max(1, chunk_elements // max(1, B * batch["items"].shape[1] * self.cfg.dim))
        parts = [torch.sigmoid(self._serve(batch, cand[:, s:s + step])) for s in range(0, cand.shape[1], step)]
        return torch.cat(parts, dim=1) if parts else cand.new_zeros(B, 0, dtype=torch.float32)

    def parameter_roles(self) -> dict[str, ParamRole]:
        """Every parameter is public."""
        return {name: PUBLIC for name, _ in self.named_parameters()}
