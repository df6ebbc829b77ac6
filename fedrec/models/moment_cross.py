"""Moment&Cross — CTR with a cross-domain branch that searches the user's other-domain history.

Jiangxia Cao, Shen Wang, Yue Li, Shenghui Wang, Jian Tang, Shiyao Wang, Shuang Yang, Zhaojie
Liu, Guorui Zhou. "Moment&Cross: Next-Generation Real-Time Cross-Domain CTR Prediction for
Live-Streaming Recommendation at Kuaishou", arXiv:2408.05709, 2024.

Live streams get a fraction of the exposure of short videos, so a user's live-stream history
is short and the short-video one long. The *Cross* part of the paper models the target
domain's CTR with the user's long history in the other domain, by search
(``../shared/reference/seed_baselines.md`` section 8):

* **own branch**: target attention (DIN) of the candidate over the user's history in the
  candidate's domain, each history token carrying its click label;
* **cross branch**: a *general search unit* (GSU) picks the ``search-top`` items of the user's
  other-domain history (its ``long-len`` most recent training impressions, only those before
  the candidate's time when ``cross-time``) most relevant to the candidate, by the inner
  product of their embeddings (no gradient through the choice); an *exact search unit*
  (ESU), target attention of the candidate over those items (with their labels), gives the
  cross-domain interest;
* **contrastive alignment** (``align-weight``): in-batch InfoNCE between each user's
  own-domain and other-domain representations (mean embeddings of the two histories), which
  pulls the two domains' item embeddings into one space;
* head ``MLP([own ; cross ; e_v ; e_u]) -> click logit``, BCE.

``cross = false`` is the model without the branch (the paper's ablation). The *Moment* part
(real-time training on 30-second windows with a first-only label mask, fast/slow windows) is
a trainer, not a model, and is not built here.

The other-domain histories are built from the training split by :meth:`MomentCross.prepare`
and saved with the model. They read another domain's data: federated, where each client is a
domain, no client may, so under the federated engine the branch is off (the model trains as
``cross = false``). Multi-domain data only (``domains=2`` synthetic data, ``cdr:`` folders;
``cdr:`` times are positions within a domain, not comparable across domains: use
``cross-time = false`` there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.backbone import ItemEncoder, UserEncoder, check_widths
from fedrec.models.base import PUBLIC, ModelData, ParamRole, RecModel
from fedrec.models.marm import TargetAttention

__all__ = ["MomentCrossConfig", "MomentCross"]


@dataclass
class MomentCrossConfig:
    """Moment&Cross's options (module docstring)."""

    dim: int = 32
    field_dim: int = 8
    heads: int = 2
    dropout: float = 0.2
    max_len: int = 50
    item_repr: str = "auto"
    user_profile: bool = True
    user_id: bool = False
    #: the cross-domain branch (false: the model without it)
    cross: bool = True
    #: other-domain history read per user (most recent training impressions)
    long_len: int = 200
    #: items the general search unit keeps for the exact search unit
    search_top: int = 16
    #: only other-domain impressions before the candidate's time
    cross_time: bool = True
    align_weight: float = 0.1
    temperature: float = 0.1
    ctr_hidden: int = 64
    task: str = "ctr"

    def __post_init__(self) -> None:
        check_widths(self, ("dim", "field_dim", "heads", "max_len", "long_len", "search_top", "ctr_hidden"))
        if self.task != "ctr":
            raise ConfigError(f"Moment&Cross is a ranking model: ctr only (got {self.task!r})")
        if not self.align_weight >= 0 or self.align_weight != self.align_weight:
            raise ConfigError(f"model option 'align-weight' must be >= 0 (got {self.align_weight})")
        if not self.temperature > 0:
            raise ConfigError(f"model option 'temperature' must be > 0 (got {self.temperature})")


class MomentCross(RecModel):
    """Moment&Cross (module docstring)."""

    tasks = ("ctr",)
    vmap_safe: bool = False

    def __init__(self, data: ModelData, cfg: MomentCrossConfig) -> None:
        super().__init__()
        if cfg.cross and len(data.domains) < 2:
            raise ConfigError("model 'moment_cross' needs multi-domain data (its cross branch reads the user's other "
                              "domains; e.g. synthetic:domains=2 or cdr:DIR), or cross = false")
        self.cfg, self.data = cfg, data
        d = cfg.dim
        self.items = ItemEncoder(data, cfg)
        self.users = UserEncoder(data, cfg)
        self.labels = nn.Embedding(2, d)
        nn.init.normal_(self.labels.weight, 0.0, d**-0.5)
        self.own = TargetAttention(d, cfg.heads, cfg.dropout)
        self.cross = TargetAttention(d, cfg.heads, cfg.dropout) if cfg.cross else None
        width = (3 if cfg.cross else 2) * d + self.users.width
        self.head = nn.Sequential(nn.Linear(width, cfg.ctr_hidden), nn.ReLU(), nn.Dropout(cfg.dropout),
                                  nn.Linear(cfg.ctr_hidden, 1))
        # other-domain histories per (domain, user): items, labels, times (data, not parameters;
        # only with the branch)
        shape = (len(data.domains), data.n_users + 1, cfg.long_len) if cfg.cross else (0, 0, 0)
        self.long_items = torch.zeros(shape, dtype=torch.long)
        self.long_labels = torch.zeros(shape, dtype=torch.long)
        self.long_times = torch.zeros(shape, dtype=torch.float64)

    # -- the other-domain histories -------------------------------------------------------
    def prepare(self, split) -> None:
        """Each user's most recent ``long-len`` training impressions outside each domain."""
        from fedrec.data.split import TRAIN

        if not self.cfg.cross or self._loaded:
            return
        L = self.cfg.long_len
        rows = np.flatnonzero(split.part == TRAIN)
        row_domain = np.repeat(split.seq_domain, np.diff(split.indptr))[rows]
        row_user = split.row_user[rows]
        times = np.asarray(split.time, dtype=np.float64)[rows]
        items = torch.zeros_like(self.long_items)
        labels = torch.zeros_like(self.long_labels)
        when = torch.zeros_like(self.long_times)
        for d in range(len(split.domains)):
            other = row_domain != d
            r, u, t = rows[other], row_user[other], times[other]
            order = np.lexsort((t, u))
            r, u, t = r[order], u[order], t[order]
            # position from the end within each user: keep the last L, left-padded
            counts = np.bincount(u, minlength=split.n_users + 1)
            ends = np.cumsum(counts)
            from_end = ends[u] - 1 - np.arange(len(u))
            keep = from_end < L
            col = L - 1 - from_end[keep]
            items[d, u[keep], col] = torch.from_numpy(split.item[r[keep]])
            labels[d, u[keep], col] = torch.from_numpy(split.label[r[keep]].astype(np.int64))
            when[d, u[keep], col] = torch.from_numpy(t[keep])
        self.long_items, self.long_labels, self.long_times = items, labels, when

    _loaded = False

    @property
    def fits_on_log(self) -> bool:
        """Whether :meth:`prepare` reads the training log (the cross branch's histories): a
        stream, which may not read its future, refuses it."""
        return bool(self.cfg.cross)

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        """The other-domain histories (saved with the weights)."""
        return {"items": self.long_items, "labels": self.long_labels, "times": self.long_times}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the other-domain histories."""
        self.long_items, self.long_labels = state["items"].long(), state["labels"].long()
        self.long_times = state["times"].double()
        self._loaded = bool((self.long_items != 0).any())

    # -- the model --------------------------------------------------------------------------
    def _branches(self, batch: dict[str, torch.Tensor], targets: torch.Tensor, *,
                  every_position: bool = False) -> dict[str, Any]:
        """Both branches for ``targets`` ``(B, C)``: every position's target (``every_position``:
        position t sees the history up to t) or candidates after the whole history."""
        items = batch["items"]
        B, T = items.shape
        C = targets.shape[1]
        e_y = self.items(targets)  # (B, C, d)
        hist = self.items(items) + self.labels(batch["labels"].clamp(0, 1))
        pad = items == 0
        if every_position:
            mask = torch.tril(torch.ones(T, T, dtype=torch.bool, device=items.device)).unsqueeze(0) & ~pad.unsqueeze(1)
        else:  # candidates after the whole history
            mask = (~pad).unsqueeze(1).expand(-1, C, -1)
        out = {"e_y": e_y, "own": self.own(e_y, hist, mask), "hist": hist, "pad": pad}
        if self.cross is None or self.vmap_safe:
            if self.cross is not None:  # federated: the branch is off
                out["cross"] = torch.zeros_like(out["own"])
            return out
        dom = batch["domain"].clamp(min=0)
        user = batch["user"]
        long_items = self.long_items[dom, user]  # (B, L)
        long_real = long_items != 0
        long_emb = self.items(long_items) + self.labels(self.long_labels[dom, user])
        # general search: relevance to the candidate, no gradient through the choice
        rel = torch.einsum("bcd,bld->bcl", e_y.detach(), self.items(long_items).detach())
        allowed = long_real.unsqueeze(1).expand(-1, C, -1)
        if self.cfg.cross_time and "target_times" in batch:
            t = batch["target_times"] if every_position else batch["target_times"][:, -1:].expand(-1, C)
            t = torch.nan_to_num(t, nan=float("inf"))
            allowed = allowed & (self.long_times[dom, user].unsqueeze(1) < t.unsqueeze(-1))
        rel = rel.masked_fill(~allowed, float("-inf"))
        k = min(self.cfg.search_top, long_items.shape[1])
        top = rel.topk(k, dim=-1)  # (B, C, k)
        chosen = torch.gather(long_emb.unsqueeze(1).expand(-1, C, -1, -1), 2,
                              top.indices.unsqueeze(-1).expand(-1, -1, -1, long_emb.shape[-1]))  # (B, C, k, d)
        ok = torch.isfinite(top.values)  # (B, C, k)
        # exact search: target attention of each candidate over its own k items
        q = e_y.reshape(B * C, 1, -1)
        kv = chosen.reshape(B * C, k, -1)
        cross = self.cross(q, kv, ok.reshape(B * C, 1, k)).reshape(B, C, -1)
        cross = cross * ok.any(-1, keepdim=True).to(cross.dtype)  # nothing found: no cross interest
        out.update(cross=cross, long_emb=long_emb, long_real=long_real)
        return out

    def _logits(self, batch: dict[str, torch.Tensor], parts: dict[str, Any]) -> torch.Tensor:
        e_y = parts["e_y"]
        u = self.users(batch["user"], batch.get("user_codes")).unsqueeze(1).expand(-1, e_y.shape[1], -1)
        feats = [parts["own"]] + ([parts["cross"]] if "cross" in parts else []) + [e_y, u]
        return self.head(torch.cat(feats, dim=-1)).squeeze(-1)

    def forward(self, batch: dict[str, torch.Tensor], mode: str = "train") -> Any:
        """``train``: logits ``(B, T)`` of every position's target; ``loss``; ``ctr``;
        ``ctr-all``."""
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
        parts = self._branches(batch, batch["target_items"], every_position=True)
        return {"logits": self._logits(batch, parts), "parts": parts, "context": {"routing": []}}

    def loss(self, batch: dict[str, torch.Tensor], out: dict[str, Any]) -> torch.Tensor:
        """BCE over the real targets plus ``align-weight`` x the cross-domain InfoNCE."""
        mask = batch["target_mask"].to(out["logits"].dtype)
        bce = F.binary_cross_entropy_with_logits(out["logits"], batch["target_labels"], reduction="none")
        loss = (bce * mask).sum() / mask.sum().clamp(min=1.0)
        parts = out["parts"]
        if self.cfg.align_weight > 0 and "long_emb" in parts:
            keep_own = (~parts["pad"]).unsqueeze(-1).to(loss.dtype)
            own = (parts["hist"] * keep_own).sum(1) / keep_own.sum(1).clamp(min=1.0)
            keep_long = parts["long_real"].unsqueeze(-1).to(loss.dtype)
            other = (parts["long_emb"] * keep_long).sum(1) / keep_long.sum(1).clamp(min=1.0)
            has = (keep_own.sum((1, 2)) > 0) & (keep_long.sum((1, 2)) > 0)
            if has.sum() > 1:
                a = F.normalize(own[has], dim=-1)
                b = F.normalize(other[has], dim=-1)
                # the same user twice in a batch (several domains' sequences) is not a negative
                users = batch["user"][has]
                logits = (a @ b.T / self.cfg.temperature).masked_fill(
                    (users[:, None] == users[None, :]) & ~torch.eye(len(users), dtype=torch.bool, device=users.device), float("-inf"))
                target = torch.arange(len(users), device=users.device)
                nce = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
                loss = loss + self.cfg.align_weight * nce
        return loss

    def predict_ctr(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Click probability of the held-out impression after the whole history."""
        parts = self._branches(batch, batch["target_items"][:, -1:])
        return torch.sigmoid(self._logits(batch, parts))[:, 0]

    def predict_ctr_candidates(self, batch: dict[str, torch.Tensor], candidates: torch.Tensor, *,
                               chunk_elements: int = 1 << 22) -> torch.Tensor:
        """``(B, C)`` click probabilities of ``candidates`` (``(C,)`` or ``(B, C)``) as the next
        impression."""
        B = batch["items"].shape[0]
        cand = candidates.unsqueeze(0).expand(B, -1) if candidates.dim() == 1 else candidates
        width = max(batch["items"].shape[1], self.cfg.long_len) * self.cfg.dim
        step = max(1, chunk_elements // max(1, B * width))
        parts = []
        for s in range(0, cand.shape[1], step):
            chunk = cand[:, s:s + step]
            parts.append(torch.sigmoid(self._logits(batch, self._branches(batch, chunk))))
        return torch.cat(parts, dim=1) if parts else cand.new_zeros(B, 0, dtype=torch.float32)

    def parameter_roles(self) -> dict[str, ParamRole]:
        """Every parameter is public."""
        return {name: PUBLIC for name, _ in self.named_parameters()}
