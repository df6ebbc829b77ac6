"""MF — matrix factorisation for implicit feedback: the model of FedMF and PFedRec.

Yehuda Koren, Robert Bell, Chris Volinsky. "Matrix Factorization Techniques for Recommender
Systems", IEEE Computer 2009; trained on implicit feedback with binary cross-entropy against
sampled negatives as in Xiangnan He et al., "Neural Collaborative Filtering", WWW 2017.
Federated with :mod:`fedrec.federated.fedmf` (Di Chai et al., "Secure Federated Matrix
Factorization", IEEE Intelligent Systems 2020) and :mod:`fedrec.federated.pfedrec`
(Chunxu Zhang et al., "Dual Personalization on Federated Recommendation", IJCAI 2023).

Score of item ``i`` for user ``u``::

    s(u, i) = p_u . q_i  (+ c_u with ``user_bias``)  (+ b_i with ``item_bias``)

``p_u`` (``users.weight``) and ``c_u`` (``user_bias.weight``) are per-user tables (one row per
user, row 0 = padding), role ``private`` per user; ``q_i`` (``items.weight``) and ``b_i``
(``item_bias.weight``) are item tables, role ``public``. PFedRec's "score function" — a linear
layer ``w_u . q_i + c_u`` followed by a sigmoid, private to each user — is exactly ``p_u`` and
``c_u`` here, so both federated algorithms train this one model and differ in what the
algorithm does with it.

Training (next-item task only): every real target position of the user's training window
(the latest ``max_len`` training interactions; the first of them is history only, as for the
sequence models, so every model trains on the same targets) is a positive with its sampled
negatives, and the loss is the mean binary cross-entropy over all of those examples (the
positive and each negative count once, as in NCF and the PFedRec code). The history order is
not used. Every row starts at N(0, 1/dim) (padding rows 0), so first scores are O(1/sqrt(dim)).

Options: ``dim`` (32, PFedRec's latent size), ``max_len`` (512: how many of the user's latest
training interactions it learns from; users with more keep the latest ``max_len``),
``user_bias`` (false), ``item_bias`` (false).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.base import PRIVATE_PER_USER, PUBLIC, ModelData, ParamRole, RecModel

__all__ = ["MF", "MFConfig"]


@dataclass
class MFConfig:
    """Options of :class:`MF` (see the module docstring)."""

    dim: int = 32
    max_len: int = 512
    user_bias: bool = False
    item_bias: bool = False
    task: str = "next_item"

    def __post_init__(self) -> None:
        for name in ("dim", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model option '{name}' must be a positive integer (got {value!r})")
        if self.task != "next_item":
            raise ConfigError(f"model 'mf' supports the next_item task only (got {self.task!r})")


def _init(table: nn.Embedding, std: float) -> None:
    with torch.no_grad():
        table.weight.normal_(0.0, std)
        table.weight[0].zero_()


class MF(RecModel):
    """Matrix factorisation (see the module docstring)."""

    tasks = ("next_item",)
    #: set by the federated engine on its working copy (nothing here depends on it)
    vmap_safe: bool = False

    def __init__(self, data: ModelData, cfg: MFConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.data = data
        std = cfg.dim**-0.5
        # per-user tables are sparse, so a centralised optimiser step touches only the batch's users
        self.users = nn.Embedding(data.n_users + 1, cfg.dim, sparse=True)
        self.items = nn.Embedding(data.n_items + 1, cfg.dim)
        _init(self.users, std)
        _init(self.items, std)
        self.user_bias = nn.Embedding(data.n_users + 1, 1, sparse=True) if cfg.user_bias else None
        self.item_bias = nn.Embedding(data.n_items + 1, 1) if cfg.item_bias else None
        for table in (self.user_bias, self.item_bias):
            if table is not None:
                nn.init.zeros_(table.weight)

    # -- pieces ---------------------------------------------------------------------
    def _item_rows(self, items: torch.Tensor, maps: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Rows of the item tables for item indices (local ones with compact tables)."""
        return items if maps is None else maps["id"][items]

    def _user(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, dim)`` user vectors and ``(B, 1)`` user biases (None without)."""
        user = batch["user"]
        bias = self.user_bias(user) if self.user_bias is not None else None
        return self.users(user), bias

    def _scores(self, p: torch.Tensor, c: torch.Tensor | None, items: torch.Tensor,
                maps: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Scores of ``items`` ``(B, ...)`` for users ``p`` ``(B, dim)``: same shape as ``items``."""
        rows = self._item_rows(items, maps)
        q = self.items(rows)  # (B, ..., dim)
        shape = (p.shape[0],) + (1,) * (items.dim() - 1) + (p.shape[1],)
        out = (p.view(shape) * q).sum(-1)
        if c is not None:
            out = out + c.view(shape[:-1])
        if self.item_bias is not None:
            out = out + self.item_bias(rows).squeeze(-1)
        return out

    # -- the model interface ---------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor], mode: str = "train") -> Any:
        """Score the batch's targets and negatives (``train``); ``loss`` returns ``(loss,
        outputs)``; ``candidates`` the scores of ``batch["candidates"]``; ``all`` every
        item's (the modes :func:`torch.func.functional_call` needs in the federated engine;
        ``batch["item_maps"]`` — compact item tables — is honoured in every mode)."""
        if mode == "loss":
            out = self.forward(batch)
            return self.loss(batch, out), out
        if mode == "candidates":
            return self.score_candidates(batch, batch["candidates"])
        if mode == "all":
            return self.score_all(batch)
        if mode != "train":
            raise ValueError(f"unknown forward mode {mode!r}")
        maps = batch.get("item_maps")
        p, c = self._user(batch)
        out: dict[str, Any] = {"logits": self._scores(p, c, batch["target_items"], maps),
                               "context": {"routing": []}}
        if "negatives" in batch:
            out["neg_logits"] = self._scores(p, c, batch["negatives"], maps)  # (B, T, n)
        return out

    def loss(self, batch: dict[str, torch.Tensor], out: dict[str, Any]) -> torch.Tensor:
        """Mean BCE over the real targets (label 1) and their negatives (label 0), each one
        example (masked sums, so it runs under ``torch.func.vmap``)."""
        if "neg_logits" not in out:
            raise ConfigError("model 'mf' trains against sampled negatives (the batch has none)")
        weight = batch["target_mask"].to(out["logits"].dtype)
        pos = F.binary_cross_entropy_with_logits(out["logits"], torch.ones_like(out["logits"]), reduction="none")
        neg_logits = out["neg_logits"]
        neg = F.binary_cross_entropy_with_logits(neg_logits, torch.zeros_like(neg_logits), reduction="none").sum(-1)
        examples = (weight.sum() * (1 + neg_logits.shape[-1])).clamp(min=1.0)
        return ((pos + neg) * weight).sum() / examples

    def score_candidates(self, batch: dict[str, torch.Tensor], candidates: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` scores of candidate items (the history is not read)."""
        p, c = self._user(batch)
        return self._scores(p, c, candidates, batch.get("item_maps"))

    def score_all(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, n_items + 1)`` scores of every item (column 0 = padding)."""
        p, c = self._user(batch)
        items = torch.arange(self.data.n_items + 1, device=p.device).expand(p.shape[0], -1)
        return self._scores(p, c, items, batch.get("item_maps"))

    def parameter_roles(self) -> dict[str, ParamRole]:
        """User tables private per user; item tables public."""
        return {name: PRIVATE_PER_USER if name.startswith("user") else PUBLIC for name, _ in self.named_parameters()}

    def item_tables(self) -> dict[str, tuple[str, torch.Tensor | None]]:
        """Both item tables are read through item indices only: the federated engine may
        train per-user compact copies of them."""
        out: dict[str, tuple[str, torch.Tensor | None]] = {"items.weight": ("id", None)}
        if self.item_bias is not None:
            out["item_bias.weight"] = ("id", None)
        return out
