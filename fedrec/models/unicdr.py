"""UniCDR — universal cross-domain recommendation, and its single-domain and pooled baselines.

Jiangxia Cao, Shaoshuai Li, Bowen Yu, Xiaobo Guo, Tingwen Liu, Bin Wang. "Towards Universal
Cross-Domain Recommendation", WSDM 2023 (code: ``cjx96/UniCDR``, read for facts only). The
UniCDR+ options follow "A Unified Framework for Cross-Domain Recommendation" (arXiv
2409.04540), whose body could not be read: where it is silent the choice is ours and is
named below.

One example is ``(user u, domain d, positive item i)`` with ``n`` sampled negatives of the
same domain (:mod:`fedrec.data.batching`, task ``cdr``). The user's vector in domain ``d``::

    u_spec   = dropout(A_d(U_d[u],  V[own-domain context]))          domain-specific
    u_shared = dropout(A_s(S[u],    V[shared context]))               domain-shared
    score(u, i) = (u_spec + u_shared) . V[i]

``U_d`` (``user_spec.<k>``) is domain ``k``'s user table, ``S`` (``user_shared``) the table
shared by all domains, ``V`` (``items``) the item table (item indices are per domain on
cross-domain data, so each domain trains only its own rows), ``A_d`` / ``A_s`` behaviour
aggregators::

    A(e, X) = lam * e + (1 - lam) * W . pool(X)        (lam = ``lambda-agg``, W bias-free)

with ``pool`` = ``aggregator``: ``mean`` (masked mean), ``user_attention`` (keys
``tanh(W_k x + b)``, score ``key . e``, masked softmax, dropout), or ``item_similarity``
(the context items weighted by a softmax over their EASE scores for the user, EASE fitted
once on each domain's training matrix, ``lambda`` = ``ease-lambda``; a dense
``items x items`` inverse per domain, so a domain above ``ease-max-items`` items, 15,000 by
default, is refused with an error instead of running out of memory: 15k items is a 0.9 GB
float32 matrix, Sport-Cloth's 32k / 41k would be 4.2 / 6.8 GB. UniCDR also appends the
top EASE-scored unseen items to the context; not done here).

UniCDR+ options (arXiv 2409.04540; its body could not be read, so each form is our choice,
each off by default and ablated in ``simulations/configs/cdr_sport_cloth_plus.toml``):
``aggregator = sequential`` — the context in time order through a GRU, its state after the
last item the summary (the contexts are drawn as subsets in time order); ``item-hops`` = 1 or
2 — an item's vector is the mean of its id row and the mean rows of its ``item-neighbours``
(10) strongest 1-hop (and 2-hop) neighbours in the domain's training co-occurrence graph
(item-item multi-hop signals, computed on the training rows only); ``side-features`` — one
table per user / item feature field, added to the id rows (data with features only);
``contrastive = soft`` (below); ``behaviour-head = mmoe`` — a multi-behaviour head on data
with ratings: the main behaviour is an interaction (what every metric ranks), the second a
*like*, an interaction rated at least 4 (:data:`~fedrec.data.batching.LIKE_THRESHOLD`). One
MMoE per domain (``experts`` = 4 two-layer experts shared by the behaviours, a softmax gate
per behaviour; :class:`BehaviourHead`) maps the user vector to one vector per behaviour, so
both stay dot-product scores (retrievable); the like behaviour has its own item bias (with
``item-bias``). Its loss, the same BCE of the positive against the negatives with the
positive labelled 1 only when liked, is added to ``rec_d`` with weight ``behaviour-weight``
(0.5); rows without a rating do not train it. Where the paper puts the head (over the user
vector, not over each user-item pair) is our choice: it keeps scoring a matmul. ``item-bias``
(off; ours, not UniCDR's) adds a learned per-item bias to every score.

``shared-context`` chooses what ``A_s`` reads: ``other`` (UniCDR: the user's training items
in the *other* domains, each embedded with its own rows of ``V``) or ``own`` (the user's own
domain context, read through the shared aggregator: the only choice in a federation, where a
domain never sees another domain's interactions; centrally it measures what that costs).

Interaction masking: at training, each context entry is dropped with probability
``mask-rate`` (0.1), on top of the context sampling of the batches (a random subset of at
most ``max-len`` = 10 training items, never the positive itself).

Loss, per domain ``d`` present in the batch: ``rec-weight * rec_d + (1 - rec-weight) *
contrastive_d`` (UniCDR: 0.4 / 0.6), summed over domains. ``rec_d``: binary cross-entropy of
the positive (label 1) and its negatives (label 0), mean over the ``1 + n`` scores.
``contrastive``: ``hard`` (UniCDR) — a bilinear discriminator ``D_d(u_spec, u_shared)``
scores the same user's pair as 1 and a mismatched pair (``u_shared`` of the user a random
cyclic shift away in the batch's domain-``d`` rows) as 0, BCE; ``soft`` (UniCDR+; our
choice of form) — the same discriminator's scores of every pair in the domain's rows
against a soft target, the softmax (temperature ``temperature``) of the users'
specific-vector similarities, so users alike in a domain count as partly matched; ``none``.

``structure`` (baselines on the same data, training and protocol):

``unicdr``
    the model above;
``single``
    no transfer: ``u_spec`` only (no shared table, no shared aggregator, no discriminator),
    each domain its own model;
``pooled``
    one user table and one aggregator for every domain, over the union of the user's
    contexts in all domains; items keep their rows (one table), no domain structure.

Cold-start users (no training rows in a domain) have an empty own context and a row of
``U_d`` that was never trained: at evaluation their ``u_spec`` is 0, and the knowledge comes
through ``S[u]`` and the other domain's context (the ``single`` structure cannot rank for
them at all: every item scores 0).

Differences from the reference code (``cjx96/UniCDR``), on purpose: the reference selects
its dual-user-intra model on the test file (here: the validation split; ``cdr:DIR?valid=test``
reproduces the reference); its contrastive shuffle calls ``.cuda()`` unconditionally (here
the batch's device); one model is selected on the mean over domains of validation NDCG@10
(the reference keeps each domain's best epoch separately); an epoch is one pass over the
training examples (the reference: 500 random batches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.base import PUBLIC, ModelData, ParamRole, RecModel
from fedrec.models.layers import mask_dropout

__all__ = ["UniCDR", "UniCDRConfig", "BehaviourHead", "AGGREGATORS", "STRUCTURES", "BEHAVIOURS"]

AGGREGATORS = ("mean", "user_attention", "item_similarity", "sequential")
STRUCTURES = ("unicdr", "single", "pooled")
CONTRASTIVE = ("hard", "soft", "none")
SHARED_CONTEXT = ("other", "own")
BEHAVIOUR_HEADS = ("none", "mmoe")
#: the behaviours a model scores: ``main`` (an interaction: what every metric ranks) and
#: ``like`` (an interaction rated at least :data:`~fedrec.data.batching.LIKE_THRESHOLD`)
BEHAVIOURS = ("main", "like")


@dataclass
class UniCDRConfig:
    """Options of :class:`UniCDR` (see the module docstring)."""

    dim: int = 128
    aggregator: str = "mean"
    structure: str = "unicdr"
    shared_context: str = "other"
    contrastive: str = "hard"
    lambda_agg: float = 0.5
    rec_weight: float = 0.4
    temperature: float = 0.5
    dropout: float = 0.3
    mask_rate: float = 0.1
    max_len: int = 10
    eval_len: int = 50
    ease_lambda: float = 50.0
    ease_max_items: int = 15000
    item_bias: bool = False
    item_hops: int = 0
    item_neighbours: int = 10
    side_features: bool = False
    behaviour_head: str = "none"
    experts: int = 4
    behaviour_weight: float = 0.5
    task: str = "cdr"

    def __post_init__(self) -> None:
        for name in ("dim", "max_len", "eval_len", "ease_max_items", "item_neighbours", "experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model option '{name.replace('_', '-')}' must be a positive integer (got {value!r})")
        for name, known in (("aggregator", AGGREGATORS), ("structure", STRUCTURES), ("contrastive", CONTRASTIVE),
                            ("shared_context", SHARED_CONTEXT), ("behaviour_head", BEHAVIOUR_HEADS)):
            if getattr(self, name) not in known:
                raise ConfigError(f"model option '{name.replace('_', '-')}' must be one of {', '.join(known)} "
                                  f"(got {getattr(self, name)!r})")
        for name in ("lambda_agg", "rec_weight", "mask_rate", "behaviour_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0):
                raise ConfigError(f"model option '{name.replace('_', '-')}' must be in [0, 1] (got {value!r})")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"model option 'dropout' must be in [0, 1) (got {self.dropout!r})")
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"model option 'temperature' must be > 0 (got {self.temperature!r})")
        if not (np.isfinite(self.ease_lambda) and self.ease_lambda > 0):
            raise ConfigError(f"model option 'ease-lambda' must be > 0 (got {self.ease_lambda!r})")
        if self.item_hops not in (0, 1, 2):
            raise ConfigError(f"model option 'item-hops' must be 0, 1 or 2 (got {self.item_hops!r})")
        if self.task != "cdr":
            raise ConfigError(f"model 'unicdr' supports the cdr task only (got {self.task!r})")


class Aggregator(nn.Module):
    """``lam * e + (1 - lam) * W . pool(X)`` over a padded item set (see the module docstring)."""

    def __init__(self, dim: int, kind: str, lam: float, dropout: float) -> None:
        super().__init__()
        self.kind, self.lam, self.p = kind, float(lam), float(dropout)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim) if kind == "user_attention" else None
        self.gru = nn.GRU(dim, dim, batch_first=True) if kind == "sequential" else None

    def forward(self, e: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                prior: torch.Tensor | None = None) -> torch.Tensor:
        """``e`` (B, D) id vectors; ``x`` (B, T, D) item vectors; ``mask`` (B, T) real
        entries; ``prior`` (B, T) EASE scores (``item_similarity``)."""
        m = mask.to(x.dtype)
        if self.kind == "sequential":
            # the context in time order (left-aligned, padding after): a GRU, whose state
            # after the last real item is the summary; an empty context gives 0
            lengths = mask.sum(1)
            order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # real entries first
            xs = torch.gather(x, 1, order.unsqueeze(-1).expand_as(x))
            out, _ = self.gru(xs)
            last = (lengths - 1).clamp(min=0)
            pooled = out[torch.arange(x.shape[0], device=x.device), last] * (lengths > 0).unsqueeze(-1).to(x.dtype)
            return self.lam * e + (1.0 - self.lam) * self.proj(pooled)
        if self.kind == "mean":
            pooled = (x * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1.0)
        else:
            if self.kind == "user_attention":
                logits = (torch.tanh(self.key(x)) * e.unsqueeze(1)).sum(-1)
            else:
                logits = prior if prior is not None else torch.zeros_like(m)
            logits = logits.masked_fill(~mask, -1e9)
            w = torch.softmax(logits, dim=1) * m  # an empty set gets weight 0, not 1/T
            w = mask_dropout(w, self.p, self.training) if self.kind == "user_attention" else w
            pooled = (w.unsqueeze(-1) * x).sum(1)
        return self.lam * e + (1.0 - self.lam) * self.proj(pooled)


class BehaviourHead(nn.Module):
    """MMoE over a user vector (Ma et al., KDD 2018): ``experts`` two-layer experts shared by
    the behaviours, one softmax gate per behaviour; behaviour ``b``'s vector is ``u + sum_e
    g_b(u)_e * expert_e(u)``. The experts' last layers start at zero, so an untrained head
    is the identity."""

    def __init__(self, dim: int, experts: int, behaviours: int = 2) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
                                     for _ in range(experts))
        for expert in self.experts:
            nn.init.zeros_(expert[2].weight)
            nn.init.zeros_(expert[2].bias)
        self.gates = nn.ModuleList(nn.Linear(dim, experts) for _ in range(behaviours))

    def forward(self, u: torch.Tensor) -> list[torch.Tensor]:
        """One ``(B, D)`` vector per behaviour."""
        ex = torch.stack([expert(u) for expert in self.experts], dim=1)  # (B, E, D)
        return [u + (torch.softmax(gate(u), dim=-1).unsqueeze(-1) * ex).sum(1) for gate in self.gates]


class UniCDR(RecModel):
    """UniCDR and its ``single`` / ``pooled`` baselines (see the module docstring)."""

    tasks = ("cdr",)

    def __init__(self, data: ModelData, cfg: UniCDRConfig) -> None:
        super().__init__()
        if not data.domains:
            raise ConfigError("model 'unicdr' needs multi-domain data (e.g. cdr:DIR)")
        self.cfg, self.data = cfg, data
        self.n_domains = len(data.domains)
        D = cfg.dim
        std = D**-0.5
        pooled = cfg.structure == "pooled"
        # sparse tables: a step moves only the rows its batch reads (SparseAdam in the trainers)
        self.items = nn.Embedding(data.n_items + 1, D, sparse=True)
        tables = 1 if pooled else self.n_domains
        self.user_spec = nn.ModuleList(nn.Embedding(data.n_users + 1, D, sparse=True) for _ in range(tables))
        self.agg = nn.ModuleList(Aggregator(D, cfg.aggregator, cfg.lambda_agg, cfg.dropout) for _ in range(tables))
        transfer = cfg.structure == "unicdr"
        self.user_shared = nn.Embedding(data.n_users + 1, D, sparse=True) if transfer else None
        self.agg_shared = Aggregator(D, cfg.aggregator, cfg.lambda_agg, cfg.dropout) if transfer else None
        # bilinear discriminators x^T W y + b^T y, written as Linear + dot (nn.Bilinear's
        # trilinear kernel took half of a training step's time)
        self.disc = (nn.ModuleList(nn.Linear(D, D) for _ in range(self.n_domains))
                     if transfer and cfg.contrastive != "none" else None)
        with torch.no_grad():
            for table in [self.items, *self.user_spec] + ([self.user_shared] if transfer else []):
                table.weight.normal_(0.0, std)
                table.weight[0].zero_()
        # UniCDR+ side features: one table per item (and user) feature field, added to the id vector
        if cfg.side_features and data.item_features is None and data.user_features is None:
            raise ConfigError("model option 'side-features': the data has no user or item features")
        self.item_fields = nn.ModuleList(nn.Embedding(c, D, sparse=True) for c in data.item_cardinalities) \
            if cfg.side_features and data.item_features is not None else nn.ModuleList()
        self.user_fields = nn.ModuleList(nn.Embedding(c, D, sparse=True) for c in data.user_cardinalities) \
            if cfg.side_features and data.user_features is not None else nn.ModuleList()
        for table in [*self.item_fields, *self.user_fields]:
            nn.init.normal_(table.weight, 0.0, std)
        self._item_codes = data.item_features.long() if len(self.item_fields) else None
        self._user_codes = data.user_features.long() if len(self.user_fields) else None
        self._neighbours: list[torch.Tensor] = []  # item_hops: (n_items + 1, k) neighbour lists per hop
        self.item_bias = nn.Embedding(data.n_items + 1, 1, sparse=True) if cfg.item_bias else None
        if self.item_bias is not None:
            nn.init.zeros_(self.item_bias.weight)
        # UniCDR+ multi-behaviour head: one MMoE per domain (per table), and the like
        # behaviour's own item bias
        mmoe = cfg.behaviour_head == "mmoe"
        self.head = nn.ModuleList(BehaviourHead(D, cfg.experts) for _ in range(tables)) if mmoe else None
        self.like_bias = nn.Embedding(data.n_items + 1, 1, sparse=True) if mmoe and cfg.item_bias else None
        if self.like_bias is not None:
            nn.init.zeros_(self.like_bias.weight)
        # item -> domain (plain tensors, not buffers: no buffers in trainable modules)
        self._item_domain = data.item_domain.clone().long()
        self._ease: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def behaviours(self) -> tuple[str, ...]:
        """The behaviours with a score of their own (``like`` with the multi-behaviour head)."""
        return BEHAVIOURS if self.head is not None else ("main",)

    #: the context length of evaluation examples (the trainers build them with it)
    @property
    def eval_max_len(self) -> int:
        return self.cfg.eval_len

    # -- EASE prior (item_similarity) -----------------------------------------------------
    def prepare(self, split) -> None:
        """Fit what the model reads besides its parameters, on the training interactions
        (called by the trainers before the first step): the item neighbour lists of
        ``item-hops`` and the EASE item-item matrices of the ``item_similarity``
        aggregator (per domain)."""
        if self.cfg.behaviour_head != "none" and getattr(split, "rating", None) is None:
            raise ConfigError("model option 'behaviour-head': the data has no ratings, so no second behaviour "
                              "(a rating >= 4 is a like; e.g. synthetic:domains=2,behaviours=2, or a csv with a "
                              "rating column)")
        if self.cfg.item_hops:
            self._neighbours = _item_neighbours(split, self.cfg.item_neighbours, self.cfg.item_hops)
        if self.cfg.aggregator != "item_similarity":
            return
        from fedrec.data.split import TRAIN

        self._ease = []
        keep = split.part == TRAIN
        users, items = split.row_user[keep], split.item[keep]
        for k, name in enumerate(self.data.domains):
            dom_items = np.flatnonzero(split.item_domain == k)
            if len(dom_items) > self.cfg.ease_max_items:
                raise ConfigError(f"aggregator 'item_similarity': domain {name!r} has {len(dom_items):,} items, above "
                                  f"ease-max-items {self.cfg.ease_max_items:,} (EASE inverts a dense items x items "
                                  f"matrix: {len(dom_items) ** 2 * 4 / 2**30:.1f} GB here); use 'mean' or "
                                  f"'user_attention', or raise ease-max-items if the memory is there")
            local = np.full(split.n_items + 1, -1, dtype=np.int64)
            local[dom_items] = np.arange(len(dom_items))
            sel = local[items] >= 0
            X = torch.zeros(split.n_users + 1, len(dom_items))
            X[torch.from_numpy(users[sel]), torch.from_numpy(local[items[sel]])] = 1.0
            G = X.T @ X + self.cfg.ease_lambda * torch.eye(len(dom_items))
            P = torch.linalg.inv(G.double())
            B = (-P / torch.diag(P)).float()
            B.fill_diagonal_(0.0)
            self._ease.append((torch.from_numpy(dom_items), B))

    def _prior(self, items: torch.Tensor, mask: torch.Tensor, domain: int) -> torch.Tensor | None:
        """``(B, T)`` EASE scores of each context item given the rest of the context."""
        if self.cfg.aggregator != "item_similarity":
            return None
        if self._ease is None:
            raise ConfigError("aggregator 'item_similarity' needs prepare(split) before use")
        dom_items, B = self._ease[domain]
        local = torch.searchsorted(dom_items, items.clamp(min=1))
        local = local.clamp(max=len(dom_items) - 1)
        valid = mask & (dom_items[local] == items)
        sub = B[local.unsqueeze(-1), local.unsqueeze(-2)]  # (B, T, T): B[j, i]
        score = (sub * valid.unsqueeze(-1).to(sub.dtype)).sum(1)  # sum over context j
        return score

    # -- pieces ---------------------------------------------------------------------------
    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` vectors of item indices: the id row, plus (``side-features``) the
        item's feature rows, averaged (``item-hops``) with the mean vector of its 1-hop (and
        2-hop) neighbours in the training co-occurrence graph of its domain."""
        v = self._item_base(items)
        if self._neighbours:
            parts = [v]
            for hop in self._neighbours:
                nb = hop.to(items.device)[items]  # (..., k), 0 = none
                m = (nb > 0).to(v.dtype).unsqueeze(-1)
                parts.append((self._item_base(nb) * m).sum(-2) / m.sum(-2).clamp(min=1.0))
            v = torch.stack(parts).mean(0)
        return v

    def _item_base(self, items: torch.Tensor) -> torch.Tensor:
        v = self.items(items)
        if self._item_codes is not None:
            codes = self._item_codes.to(items.device)[items]  # (..., F)
            for f, table in enumerate(self.item_fields):
                v = v + table(codes[..., f])
        return v

    def _user_id(self, table: nn.Embedding, user: torch.Tensor) -> torch.Tensor:
        e = table(user)
        if self._user_codes is not None:
            codes = self._user_codes.to(user.device)[user]
            for f, field_table in enumerate(self.user_fields):
                e = e + field_table(codes[..., f])
        return e

    def _context(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Item vectors and mask of a padded context, with interaction masking in training."""
        mask = items > 0
        if self.training and self.cfg.mask_rate > 0:
            mask = mask & (torch.rand(items.shape, device=items.device) >= self.cfg.mask_rate)
        return self.item_vectors(items), mask

    def user_vectors(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``user`` (B, D) — the vector scored against items; ``spec`` / ``shared`` — its
        two parts (``shared`` absent without transfer); with the multi-behaviour head,
        ``user`` is the main behaviour's vector and ``like`` the like behaviour's."""
        out = self._user_parts(batch)
        if self.head is None:
            return out
        u, dom = out["user"], batch["domain"]
        main, like = torch.zeros_like(u), torch.zeros_like(u)
        for k, head in enumerate(self.head):
            rows = torch.arange(u.shape[0], device=u.device) if len(self.head) == 1 else \
                torch.nonzero(dom == k).squeeze(1)
            if rows.numel() == 0:
                continue
            m, l = head(u[rows])
            main, like = main.index_copy(0, rows, m), like.index_copy(0, rows, l)
        out["user"], out["like"] = main, like
        return out

    def _user_parts(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        user, dom = batch["user"], batch["domain"]
        own, other = batch["own_items"], batch["other_items"]
        B = user.shape[0]
        if cfg.structure == "pooled":
            ctx = torch.cat([own, other], dim=1)
            x, m = self._context(ctx)
            spec = self.agg[0](self._user_id(self.user_spec[0], user), x, m, None)
            return {"user": mask_dropout(spec, cfg.dropout, self.training), "spec": spec}
        x_own, m_own = self._context(own)
        spec = torch.zeros(B, cfg.dim, dtype=self.items.weight.dtype, device=user.device)
        for k in range(self.n_domains):
            rows = torch.nonzero(dom == k).squeeze(1)
            if rows.numel() == 0:
                continue
            prior = self._prior(own[rows], m_own[rows], k)
            spec = spec.index_copy(0, rows, self.agg[k](self._user_id(self.user_spec[k], user[rows]), x_own[rows],
                                                        m_own[rows], prior))
        if not self.training:
            # a user with no training item in the domain (cold-start): its row of U_d was
            # never trained, so it contributes nothing
            spec = spec * (own > 0).any(1, keepdim=True).to(spec.dtype)
        spec = mask_dropout(spec, cfg.dropout, self.training)
        out = {"spec": spec}
        if self.user_shared is None:
            out["user"] = spec
            return out
        if cfg.shared_context == "own":
            x_sh, m_sh, ctx = x_own, m_own, own
        else:
            x_sh, m_sh = self._context(other)
            ctx = other
        prior = None
        if cfg.aggregator == "item_similarity":  # each item's EASE score within its own domain
            prior = torch.zeros(ctx.shape, dtype=x_sh.dtype, device=ctx.device)
            item_dom = self._item_domain.to(ctx.device)[ctx]
            for k in range(self.n_domains):
                mk = m_sh & (item_dom == k)
                prior = torch.where(mk, self._prior(ctx, mk, k), prior)
        shared = mask_dropout(self.agg_shared(self._user_id(self.user_shared, user), x_sh, m_sh, prior), cfg.dropout,
                              self.training)
        out["shared"] = shared
        out["user"] = spec + shared
        return out

    def _bias(self, behaviour: str) -> nn.Embedding | None:
        return self.like_bias if behaviour == "like" and self.head is not None else self.item_bias

    def _vector(self, vec: dict[str, torch.Tensor], behaviour: str) -> torch.Tensor:
        if behaviour not in BEHAVIOURS:
            raise ConfigError(f"unknown behaviour {behaviour!r} (known: {', '.join(BEHAVIOURS)})")
        # without the head, one score serves both behaviours
        return vec["like"] if behaviour == "like" and "like" in vec else vec["user"]

    def _score(self, user: torch.Tensor, items: torch.Tensor, behaviour: str = "main") -> torch.Tensor:
        """Scores of ``items`` (B, C) for user vectors (B, D)."""
        v = mask_dropout(self.item_vectors(items), self.cfg.dropout, self.training)
        out = (v * user.unsqueeze(1)).sum(-1)
        bias = self._bias(behaviour)
        if bias is not None:
            out = out + bias(items).squeeze(-1)
        return out

    # -- the model interface -------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """User vectors and the logits of the positive (B, 1) and negatives (B, n) (with the
        multi-behaviour head also ``like_logits`` / ``like_neg_logits``)."""
        vec = self.user_vectors(batch)
        out = dict(vec)
        out["logits"] = self._score(vec["user"], batch["target_items"][:, :1])  # (B, 1)
        if "negatives" in batch:
            out["neg_logits"] = self._score(vec["user"], batch["negatives"])
        if "like" in vec:
            out["like_logits"] = self._score(vec["like"], batch["target_items"][:, :1], "like")
            if "negatives" in batch:
                out["like_neg_logits"] = self._score(vec["like"], batch["negatives"], "like")
        return out

    def _contrastive(self, spec: torch.Tensor, shared: torch.Tensor, k: int) -> torch.Tensor:
        n = spec.shape[0]
        layer = self.disc[k]

        def disc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (layer(a) * b).sum(-1)

        pos = disc(spec, shared)
        if self.cfg.contrastive == "hard":
            if n < 2:
                return F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
            shift = int(torch.randint(1, n, (1,)).item())
            neg = disc(spec, torch.roll(shared, shifts=shift, dims=0))
            logits = torch.cat([pos, neg])
            labels = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)])
            return F.binary_cross_entropy_with_logits(logits, labels)
        # soft: every pair (i, j) of the domain's rows, target = how alike users i and j are
        scores = layer(spec) @ shared.T  # (n, n): D(spec_i, shared_j)
        with torch.no_grad():
            unit = F.normalize(spec.detach(), dim=-1)
            target = torch.softmax(unit @ unit.T / self.cfg.temperature, dim=1)
        return -(target * torch.log_softmax(scores, dim=1)).sum(1).mean()

    def loss(self, batch: dict[str, torch.Tensor], out: dict[str, Any]) -> torch.Tensor:
        """``sum_d rec-weight * rec_d + (1 - rec-weight) * contrastive_d`` (see the module
        docstring); without transfer (or ``contrastive = none``) the recommendation loss
        alone, per domain, summed."""
        if "neg_logits" not in out:
            raise ConfigError("model 'unicdr' trains against sampled negatives (the batch has none)")
        cfg = self.cfg
        dom = batch["domain"]
        logits = torch.cat([out["logits"], out["neg_logits"]], dim=1)
        labels = torch.zeros_like(logits)
        labels[:, 0] = 1.0
        per_row = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
        like_row = like_ok = None
        if "like_logits" in out:
            if "target_ratings" not in batch:
                raise ConfigError("model option 'behaviour-head': the batch has no ratings (data without a rating column)")
            from fedrec.data.batching import LIKE_THRESHOLD

            rating = batch["target_ratings"]
            like_ok = torch.isfinite(rating)  # rows without a rating do not train the like behaviour
            like_logits = torch.cat([out["like_logits"], out["like_neg_logits"]], dim=1)
            like_labels = torch.zeros_like(like_logits)
            like_labels[:, 0] = (rating >= LIKE_THRESHOLD).to(like_logits.dtype)
            like_row = F.binary_cross_entropy_with_logits(like_logits, like_labels, reduction="none").mean(1)
        total = logits.new_zeros(())
        contrast = self.disc is not None and "shared" in out
        for k in range(self.n_domains):
            rows = torch.nonzero(dom == k).squeeze(1)
            if rows.numel() == 0:
                continue
            rec = per_row[rows].mean()
            if like_row is not None and bool(like_ok[rows].any()):
                rec = rec + cfg.behaviour_weight * like_row[rows][like_ok[rows]].mean()
            if contrast:
                con = self._contrastive(out["spec"][rows], out["shared"][rows], k)
                total = total + cfg.rec_weight * rec + (1.0 - cfg.rec_weight) * con
            else:
                total = total + rec
        return total

    def score_candidates(self, batch: dict[str, torch.Tensor], candidates: torch.Tensor,
                         behaviour: str = "main") -> torch.Tensor:
        """``(B, C)`` scores of candidate items of each row's domain, for ``behaviour``
        (``main`` or ``like``; without the multi-behaviour head both are the same score)."""
        user = self._vector(self.user_vectors(batch), behaviour)
        bias = self._bias(behaviour)
        if not self.training and candidates.shape[1] > 64 and self._plain_items:
            # many candidates: one matmul over the catalogue, then a gather (the same numbers,
            # without materialising (B, C, D) item vectors)
            scores = torch.gather(user @ self.items.weight.T, 1, candidates)
            if bias is not None:
                scores = scores + bias.weight[candidates, 0]
            return scores
        return self._score(user, candidates, behaviour)

    def score_all(self, batch: dict[str, torch.Tensor], behaviour: str = "main") -> torch.Tensor:
        """``(B, n_items + 1)`` scores for ``behaviour``; items of other domains than the
        row's get ``-inf`` (ranking is within the domain's catalogue), column 0 is padding."""
        user = self._vector(self.user_vectors(batch), behaviour)
        bias = self._bias(behaviour)
        table = self.items.weight if self._plain_items else self.item_vectors(
            torch.arange(self.data.n_items + 1, device=user.device))
        scores = user @ table.T
        if bias is not None:
            scores = scores + bias.weight[:, 0].unsqueeze(0)
        other = self._item_domain.to(user.device).unsqueeze(0) != batch["domain"].unsqueeze(1)
        return scores.masked_fill(other, float("-inf"))

    @property
    def _plain_items(self) -> bool:
        """Whether an item's vector is its id row alone (then scoring uses the table as is)."""
        return not self._neighbours and self._item_codes is None

    def parameter_roles(self) -> dict[str, ParamRole]:
        """All public centrally (the federated algorithm assigns its own roles)."""
        return {name: PUBLIC for name, _ in self.named_parameters()}


def _item_neighbours(split, k: int, hops: int) -> list[torch.Tensor]:
    """Per hop, ``(n_items + 1, k)`` neighbour lists (0 = none): the ``k`` items most often
    interacted with by the same users in training, within the item's domain (1 hop), and the
    ``k`` strongest of the two-step co-occurrence (2 hops, ``C @ C`` without the item
    itself). Computed on the split's training rows only (a node: its own users)."""
    import scipy.sparse as sps

    from fedrec.data.split import TRAIN

    keep = split.part == TRAIN
    users, items = split.row_user[keep], split.item[keep]
    n = split.n_items + 1
    X = sps.csr_matrix((np.ones(len(items), dtype=np.float32), (users, items)), shape=(split.n_users + 1, n))
    X.data[:] = 1.0
    C = (X.T @ X).tocsr()
    C.setdiag(0)
    same = split.item_domain  # never link items of different domains
    C = C.tocoo()
    ok = same[C.row] == same[C.col]
    C = sps.csr_matrix((C.data[ok], (C.row[ok], C.col[ok])), shape=(n, n))
    C.eliminate_zeros()
    out = [_top_k_rows(C, k)]
    if hops >= 2:
        C2 = (C @ C).tocsr()
        C2.setdiag(0)
        C2.eliminate_zeros()
        out.append(_top_k_rows(C2, k))
    return out


def _top_k_rows(M, k: int) -> torch.Tensor:
    """The column indices of each row's ``k`` largest entries (0-padded, ties by index)."""
    out = np.zeros((M.shape[0], k), dtype=np.int64)
    for r in range(M.shape[0]):
        start, stop = M.indptr[r], M.indptr[r + 1]
        if stop == start:
            continue
        cols, vals = M.indices[start:stop], M.data[start:stop]
        order = np.lexsort((cols, -vals))[:k]
        out[r, : len(order)] = cols[order]
    return torch.from_numpy(out)
