"""The shared sequence backbone of SASRec and MRFF: inputs, a stack of Transformer blocks
with a pluggable feed-forward part, and the two task heads.

Inputs (following the MRFF reference on KuaiSAR-R, with options beyond it):

* item representation ``item_repr``: ``attributes`` (concatenated embeddings of the item's
  categorical fields, ``field_dim`` each — the MRFF reference, no id embedding), ``id`` (an
  item-id embedding), ``both``, or ``auto`` (``both`` when the data has item features, else
  ``id``). When the concatenation is not ``dim`` wide a linear map brings it to ``dim``.
* user representation ``e_u``: concatenated user-profile field embeddings (``user_profile``)
  and/or a user-id embedding (``user_id``); used by the CTR head and by MRFF's gate.
* ``label_tokens``: each history token also carries its own feedback label (an embedding of
  click / non-click added to the item), beyond the reference.

Block (pre-LayerNorm as in SASRec's public PyTorch port and the MRFF reference)::

    q = LN_att(h); h = q + Attention(query=q, keys/values=h)
    z = LN_ffn(h); h = FFN(z, context)          # SASRec: z + PositionwiseFFN(z); MRFF: gated
    h = h * not_padding
    ... final LayerNorm

Heads: CTR — ``[h_t ; item(target) ; e_u] -> Linear -> ReLU -> Linear -> sigmoid``, BCE over
every real target position; next item — ``h_t . item(target)`` with BCE against sampled
negatives (``next_loss="bce"``, SASRec) or cross-entropy over all items (``"ce"``).

A bidirectional encoder (``bidirectional=True``, BERT4Rec-style attention) trains on the
last position of each window only: elsewhere a position would see its own target
(``bert4rec-last``); :mod:`fedrec.models.bert4rec` gives it BERT4Rec's cloze task instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.base import PRIVATE_PER_USER, PUBLIC, ModelData, ParamRole, RecModel
from fedrec.models.layers import PositionwiseFFN, SelfAttention

__all__ = ["BackboneConfig", "SequenceModel", "ResidualFFN", "check_widths"]

_ITEM_REPR = ("auto", "attributes", "id", "both")


@dataclass
class BackboneConfig:
    """Options of the sequence backbone (see the module docstring)."""

    dim: int = 48
    field_dim: int = 8
    layers: int = 2
    heads: int = 1
    dropout: float = 0.5
    max_len: int = 65
    item_repr: str = "auto"
    user_profile: bool = True
    user_id: bool = False
    label_tokens: bool = False
    bidirectional: bool = False
    ctr_hidden: int = 32
    next_loss: str = "bce"
    task: str = "ctr"

    def __post_init__(self) -> None:
        check_widths(self, ("dim", "field_dim", "layers", "heads", "max_len", "ctr_hidden"))
        if self.next_loss not in ("bce", "ce"):
            raise ConfigError(f"model option 'next_loss' must be bce or ce (got {self.next_loss!r})")
        if self.task not in ("ctr", "next_item"):
            raise ConfigError(f"task must be ctr or next_item (got {self.task!r})")
        if self.bidirectional and self.label_tokens:
            raise ConfigError("label_tokens with a bidirectional encoder would show each target's label: not allowed")


def check_widths(cfg: Any, positive: tuple[str, ...]) -> None:
    """The checks every sequence model's config shares: the ``positive`` integer options,
    ``dim`` divisible by ``heads``, ``dropout`` in [0, 1) and a known ``item_repr``."""
    for name in positive:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"model option '{name.replace('_', '-')}' must be a positive integer (got {value!r})")
    if cfg.dim % cfg.heads:
        raise ConfigError(f"model option 'dim' ({cfg.dim}) must be divisible by 'heads' ({cfg.heads})")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"model option 'dropout' must be in [0, 1) (got {cfg.dropout})")
    if cfg.item_repr not in _ITEM_REPR:
        raise ConfigError(f"model option 'item-repr' must be one of {', '.join(_ITEM_REPR)} (got {cfg.item_repr!r})")


def _small_init(embedding: nn.Embedding, dim: int) -> None:
    """N(0, 1/dim) rows (padding row kept at 0): id vectors of norm about 1, so the first
    dot-product scores are O(1). PyTorch's default N(0, 1) gives scores of magnitude ~dim,
    which saturates the next-item BCE and stalls learning at popularity level."""
    with torch.no_grad():
        embedding.weight.normal_(0.0, dim**-0.5)
        if embedding.padding_idx is not None:
            embedding.weight[embedding.padding_idx].zero_()


class ItemEncoder(nn.Module):
    """Item index -> ``dim``-wide representation (id and/or attribute embeddings)."""

    def __init__(self, data: ModelData, cfg: BackboneConfig) -> None:
        super().__init__()
        mode = cfg.item_repr
        if mode == "auto":
            mode = "both" if data.item_features is not None else "id"
        if mode in ("attributes", "both") and data.item_features is None:
            raise ConfigError(f"item_repr '{mode}' needs item features, and this data has none")
        self.mode = mode
        width = 0
        self.id_embedding = None
        if mode in ("id", "both"):
            self.id_embedding = nn.Embedding(data.n_items + 1, cfg.dim, padding_idx=0)
            _small_init(self.id_embedding, cfg.dim)
            width += cfg.dim
        self.fields = nn.ModuleList()
        self._features = None  # data, not a parameter or buffer (Opacus forbids buffers)
        if mode in ("attributes", "both"):
            self._features = data.item_features
            self.fields = nn.ModuleList(nn.Embedding(c, cfg.field_dim) for c in data.item_cardinalities)
            width += cfg.field_dim * len(self.fields)
        self.project = nn.Linear(width, cfg.dim) if width != cfg.dim else None

    def forward(self, items: torch.Tensor, maps: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``(...,)`` item indices -> ``(..., dim)``.

        With ``maps`` (the federated engine's compact tables, see :meth:`tables`), ``items``
        are *local* item indices and ``maps[key][i]`` is the row of local item ``i`` in the
        compact table ``key`` that replaces the full one."""
        parts = []
        if self.id_embedding is not None:
            parts.append(self.id_embedding(items if maps is None else maps["id"][items]))
        if len(self.fields):
            if maps is None:
                codes = self._features.to(items.device)[items]  # (..., F)
                parts.extend(emb(codes[..., j].contiguous()) for j, emb in enumerate(self.fields))
            else:
                parts.extend(emb(maps[f"field{j}"][items]) for j, emb in enumerate(self.fields))
        x = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        return self.project(x) if self.project is not None else x

    def tables(self, prefix: str = "") -> dict[str, tuple[str, torch.Tensor | None]]:
        """The embedding tables read through item indices: parameter name (with
        ``prefix``) -> ``(key, row_of_item)``, where ``row_of_item`` ``(n_items + 1,)`` gives
        each item's row (None: the item index itself) and ``key`` names the map
        :meth:`forward` takes for it."""
        out: dict[str, tuple[str, torch.Tensor | None]] = {}
        if self.id_embedding is not None:
            out[f"{prefix}id_embedding.weight"] = ("id", None)
        for j in range(len(self.fields)):
            out[f"{prefix}fields.{j}.weight"] = (f"field{j}", self._features[:, j].long())
        return out


class UserEncoder(nn.Module):
    """User index -> profile (and optional id) embedding ``e_u`` (width may be 0)."""

    def __init__(self, data: ModelData, cfg: BackboneConfig) -> None:
        super().__init__()
        self._features = data.user_features if cfg.user_profile else None
        self.fields = nn.ModuleList()
        if self._features is not None:
            self.fields = nn.ModuleList(nn.Embedding(c, cfg.field_dim) for c in data.user_cardinalities)
        self.id_embedding = nn.Embedding(data.n_users + 1, cfg.field_dim) if cfg.user_id else None
        if self.id_embedding is not None:
            _small_init(self.id_embedding, cfg.field_dim)
        self.width = cfg.field_dim * (len(self.fields) + (1 if cfg.user_id else 0))

    def forward(self, users: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` user indices -> ``(B, width)``. ``codes`` ``(B, F)`` gives the users'
        profile codes directly (the federated engine, which renumbers users inside a
        shard); by default they are looked up by user index."""
        parts = []
        if len(self.fields):
            if codes is None:
                codes = self._features.to(users.device)[users]
            parts.extend(emb(codes[:, j].contiguous()) for j, emb in enumerate(self.fields))
        if self.id_embedding is not None:
            parts.append(self.id_embedding(users))
        if not parts:
            return torch.zeros(users.shape[0], 0, device=users.device)
        return torch.cat(parts, dim=-1)


class ResidualFFN(nn.Module):
    """SASRec's feed-forward part: ``z + PositionwiseFFN(z)``."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.ffn = PositionwiseFFN(cfg.dim, cfg.dim, dropout=cfg.dropout)

    def forward(self, z: torch.Tensor, context: dict[str, Any]) -> torch.Tensor:
        """``(B, T, dim)`` -> ``(B, T, dim)``; ``context`` is unused."""
        return z + self.ffn(z)


class SequenceModel(RecModel):
    """A Transformer sequence model whose blocks' FFN part comes from ``make_ffn(layer)``.

    Parameters
    ----------
    data:
        Facts about the data (sizes, feature tables).
    cfg:
        Backbone options.
    make_ffn:
        Builds the FFN part of block ``layer``: a module ``(z, context) -> (B, T, dim)``.
    """

    #: set by the federated engine on its working copy: compute the loss without
    #: data-dependent shapes, so it runs under ``torch.func.vmap``
    vmap_safe: bool = False
    #: CTR: scores a batch's ``negatives`` (stage samples of each position's request) as
    #: ``neg_logits`` with the same head (stage-aware training, ``stage-negatives``)
    ctr_stage_negatives: bool = True

    def __init__(self, data: ModelData, cfg: BackboneConfig, make_ffn: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.cfg = cfg
        self.data = data
        self.items = ItemEncoder(data, cfg)
        self.users = UserEncoder(data, cfg)
        self.positions = nn.Embedding(cfg.max_len, cfg.dim)
        self.label_embedding = nn.Embedding(3, cfg.dim) if cfg.label_tokens else None  # 0 pad, 1 non-click, 2 click
        #: the [mask] token of a cloze-trained encoder (BERT4Rec; None otherwise)
        self.mask_embedding: nn.Embedding | None = None
        self.drop = nn.Dropout(cfg.dropout)
        self.attn_norms = nn.ModuleList(nn.LayerNorm(cfg.dim) for _ in range(cfg.layers))
        self.attns = nn.ModuleList(
            SelfAttention(cfg.dim, cfg.heads, dropout=cfg.dropout, causal=not cfg.bidirectional) for _ in range(cfg.layers)
        )
        self.ffn_norms = nn.ModuleList(nn.LayerNorm(cfg.dim) for _ in range(cfg.layers))
        self.ffns = nn.ModuleList(make_ffn(layer) for layer in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.dim)
        if cfg.task == "ctr":
            self.ctr_head = nn.Sequential(
                nn.Linear(2 * cfg.dim + self.users.width, cfg.ctr_hidden), nn.ReLU(), nn.Linear(cfg.ctr_hidden, 1)
            )

    # -- encoder --------------------------------------------------------------------
    def encode(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Hidden states ``h`` (B, T, dim), ``padding`` (B, T), ``user`` embedding and the
        ``context`` the FFN parts filled in (e.g. MRFF's routing)."""
        items = batch["items"]
        T = items.shape[1]
        if T > self.cfg.max_len:
            raise ConfigError(f"sequence length {T} exceeds the model's max_len {self.cfg.max_len}")
        cloze = batch.get("cloze_mask")  # BERT4Rec: positions whose item is replaced by [mask]
        padding = items == 0 if cloze is None else (items == 0) & ~cloze
        keep = (~padding).unsqueeze(-1).float()
        maps = batch.get("item_maps")
        h = self.items(items, maps)
        if cloze is not None:
            h = torch.where(cloze.unsqueeze(-1), self.mask_embedding.weight[0], h)
        h = h * math.sqrt(self.cfg.dim)
        if self.label_embedding is not None:
            tokens = torch.where(padding, torch.zeros_like(items), batch["labels"].long() + 1)
            h = h + self.label_embedding(tokens)
        pos = torch.arange(self.cfg.max_len - T, self.cfg.max_len, device=items.device)
        h = self.drop(h + self.positions(pos.expand(items.shape[0], T).contiguous())) * keep
        user = self.users(batch["user"], batch.get("user_codes"))
        context: dict[str, Any] = {"padding": padding, "keep": keep, "user_repr": user, "user": batch["user"],
                                   "routing": [], "group_share": batch.get("group_share"),
                                   "group_alive": batch.get("group_alive"), "vmap_safe": self.vmap_safe}
        for layer in range(self.cfg.layers):
            q = self.attn_norms[layer](h)
            h = q + self.attns[layer](h, padding, query=q)
            z = self.ffn_norms[layer](h)
            h = self.ffns[layer](z, context) * keep
        return {"h": self.final_norm(h), "padding": padding, "user_repr": user, "context": context}

    def forward(self, batch: dict[str, torch.Tensor], mode: str = "train") -> Any:
        """Encode and score the batch's targets (and negatives, for next item).

        Other ``mode`` values serve ``torch.func.functional_call``, which reparametrises
        only what runs inside ``forward``: ``loss`` returns ``(loss, outputs)``; ``ctr`` the
        click probabilities at the last position; ``candidates`` the scores of
        ``batch["candidates"]``; ``all`` the scores of every item; ``ctr-all`` the click
        probability of every item as the next impression (:meth:`predict_ctr_candidates`);
        ``encode-last`` / ``ctr-head`` the two halves of it.
        """
        if "item_maps" in batch and mode in ("candidates", "all", "ctr-all"):
            raise ValueError("compact item tables (batch['item_maps']) serve training only, not scoring")
        if mode == "loss":
            out = self.forward(batch)
            return self.loss(batch, out), out
        if mode == "ctr":
            return self.predict_ctr(batch)
        if mode == "candidates":
            return self.score_candidates(batch, batch["candidates"])
        if mode == "all":
            return self.score_all(batch)
        if mode == "ctr-all":
            return self.predict_ctr_candidates(batch, torch.arange(self.data.n_items + 1, device=batch["user"].device))
        if mode == "encode-last":  # (h at the last position, user representation)
            out = self.encode(batch)
            return out["h"][:, -1], out["user_repr"]
        if mode == "ctr-head":  # batch: h, user_repr, candidates (see ctr_from_encoding)
            return self.ctr_from_encoding(batch["h"], batch["user_repr"], batch["candidates"])
        if mode != "train":
            raise ValueError(f"unknown forward mode {mode!r}")
        out = self.encode(batch)
        h = out["h"]
        maps = batch.get("item_maps")
        target = self.items(batch["target_items"], maps)  # (B, T, dim)
        if self.cfg.task == "ctr":
            u = out["user_repr"].unsqueeze(1).expand(-1, h.shape[1], -1)
            out["logits"] = self.ctr_head(torch.cat([h, target, u], dim=-1)).squeeze(-1)
            if "negatives" in batch:  # stage-aware training: extra non-clicks of each position's request
                n = batch["negatives"].shape[-1]
                neg = self.items(batch["negatives"], maps)  # (B, T, n, dim)
                x = torch.cat([h.unsqueeze(2).expand(-1, -1, n, -1), neg, u.unsqueeze(2).expand(-1, -1, n, -1)], dim=-1)
                out["neg_logits"] = self.ctr_head(x).squeeze(-1)  # (B, T, n)
        else:
            out["logits"] = (h * target).sum(-1)
            if "negatives" in batch and self.cfg.next_loss == "bce":
                neg = self.items(batch["negatives"], maps)  # (B, T, n, dim)
                out["neg_logits"] = (h.unsqueeze(2) * neg).sum(-1)
        return out

    def loss(self, batch: dict[str, torch.Tensor], out: dict[str, Any]) -> torch.Tensor:
        """Task loss averaged over real target positions, plus any auxiliary loss.

        Written with masked sums rather than boolean indexing, so that it also runs under
        ``torch.func.vmap`` (one user per slice) in the federated engine.
        """
        # a model may train other positions/targets than the batch's (BERT4Rec's cloze)
        mask = out.get("loss_mask", batch["target_mask"])
        targets = out.get("loss_targets", batch["target_items"])
        if self.cfg.bidirectional and "loss_mask" not in out:
            # position t of a bidirectional encoder sees item t+1 (its own target): train on
            # the last position only, whose target is not in the input
            last = torch.zeros_like(mask)
            last[..., -1] = True
            mask = mask & last
        weight = mask.float()
        count = weight.sum().clamp(min=1.0)
        logits = out["logits"]
        if self.cfg.task == "ctr":
            per_pos = F.binary_cross_entropy_with_logits(logits, batch["target_labels"].to(logits.dtype), reduction="none")
        elif self.cfg.next_loss == "bce":
            per_pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
            neg_logits = out["neg_logits"]
            per_neg = F.binary_cross_entropy_with_logits(neg_logits, torch.zeros_like(neg_logits), reduction="none")
            per_pos = per_pos + per_neg.mean(-1)
        elif "item_maps" in batch:
            raise ValueError("full cross-entropy reads every item: it cannot run on compact item tables")
        elif not self.vmap_safe:
            # full cross-entropy on the real positions only (boolean indexing is cheaper on
            # short sequences but has a data-dependent shape, so not under vmap)
            table = self.items(torch.arange(self.data.n_items + 1, device=out["h"].device))
            all_logits = out["h"][mask] @ table.T
            all_logits[:, 0] = float("-inf")
            return F.cross_entropy(all_logits, targets[mask]) + self.auxiliary_loss(out)
        else:
            table = self.items(torch.arange(self.data.n_items + 1, device=out["h"].device))
            all_logits = out["h"] @ table.T  # (B, T, n_items + 1)
            pad = torch.zeros(all_logits.shape[-1], dtype=torch.bool, device=all_logits.device)
            pad[0] = True
            all_logits = all_logits.masked_fill(pad, float("-inf"))
            per_pos = F.cross_entropy(all_logits.flatten(0, -2), targets.flatten(),
                                      reduction="none", ignore_index=0).view_as(logits)
        task = (per_pos * weight).sum() / count
        return task + self.auxiliary_loss(out)

    def parameter_roles(self) -> dict[str, ParamRole]:
        """User-id embeddings are private per user; everything else is public."""
        return {
            name: PRIVATE_PER_USER if name.startswith("users.id_embedding.") else PUBLIC
            for name, _ in self.named_parameters()
        }

    def item_tables(self) -> dict[str, tuple[str, torch.Tensor | None]] | None:
        """The tables read through item indices (see :meth:`ItemEncoder.tables`), so that
        the federated engine can give each user a compact copy of only the rows its
        sequence, targets and negatives touch; None when the training loss reads every row
        (next item with full cross-entropy)."""
        if self.cfg.task == "next_item" and self.cfg.next_loss == "ce":
            return None
        return self.items.tables("items.")

    def auxiliary_loss(self, out: dict[str, Any]) -> torch.Tensor:
        """Extra loss terms (none for the plain backbone)."""
        return out["h"].new_zeros(())

    # -- evaluation -----------------------------------------------------------------
    def predict_ctr(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Click probability at the last position (the held-out impression)."""
        return torch.sigmoid(self.forward(batch)["logits"][:, -1])

    def predict_ctr_candidates(self, batch: dict[str, torch.Tensor], candidates: torch.Tensor, *,
                               chunk_elements: int = 1 << 24) -> torch.Tensor:
        """``(B, C)`` click probabilities of candidate items as the impression that follows
        the last position (CTR task): for each candidate, what :meth:`predict_ctr` gives with
        that item as the held-out target, computed the same way (the CTR head on ``[h_t ;
        item ; e_u]``).

        ``candidates`` is ``(C,)`` (the same items for every row, e.g. the whole catalogue)
        or ``(B, C)``. The history is encoded once; the head runs on chunks of candidates
        whose input holds at most ``chunk_elements`` values, which bounds memory for large
        catalogues.
        """
        if self.cfg.task != "ctr":
            raise ConfigError(f"click probabilities need a model built for the ctr task (this one: {self.cfg.task})")
        if "item_maps" in batch:
            raise ValueError("compact item tables (batch['item_maps']) serve training only, not scoring")
        out = self.encode(batch)
        return self.ctr_from_encoding(out["h"][:, -1], out["user_repr"], candidates, chunk_elements=chunk_elements)

    def ctr_from_encoding(self, h: torch.Tensor, user: torch.Tensor, candidates: torch.Tensor, *,
                          chunk_elements: int = 1 << 24) -> torch.Tensor:
        """The CTR head of :meth:`predict_ctr_candidates` on an encoding already computed:
        ``h`` ``(B, dim)`` (the last position), ``user`` ``(B, w)`` -> ``(B, C)``."""
        B, C = h.shape[0], candidates.shape[-1]
        shared = candidates.dim() == 1
        width = 2 * self.cfg.dim + user.shape[1]
        step = max(1, chunk_elements // max(1, B * width))
        parts = []
        for start in range(0, C, step):
            cand = candidates[..., start : start + step]  # (c,) or (B, c)
            c = cand.shape[-1]
            target = self.items(cand)  # (c, dim) or (B, c, dim)
            if shared:
                target = target.unsqueeze(0).expand(B, -1, -1)
            x = torch.cat([h.unsqueeze(1).expand(-1, c, -1), target, user.unsqueeze(1).expand(-1, c, -1)], dim=-1)
            parts.append(torch.sigmoid(self.ctr_head(x).squeeze(-1)))  # (B, c)
        return torch.cat(parts, dim=1) if parts else h.new_zeros(B, 0)

    def score_candidates(self, batch: dict[str, torch.Tensor], candidates: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` scores of candidate items at the last position."""
        h = self.encode(batch)["h"][:, -1]
        return (h.unsqueeze(1) * self.items(candidates)).sum(-1)

    def score_all(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, n_items + 1)`` scores of every item at the last position (column 0 = padding)."""
        h = self.encode(batch)["h"][:, -1]
        table = self.items(torch.arange(self.data.n_items + 1, device=h.device))
        return h @ table.T
