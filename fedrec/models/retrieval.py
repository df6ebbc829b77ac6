"""What the next-item *retrieval* models share (KuaiFormer, DimeRec, ELASTIC): user vectors
at every position of a behaviour sequence, one or several interests per position, scored
against item vectors by inner product, trained with a softmax over items.

Scoring with ``K`` interests ``u_1..u_K`` is ``max_k <u_k, x>`` (KuaiFormer, ComiRec). In
training, each position's loss uses the interest closest to its target,
``k* = argmax_k <u_k, e_y>`` (ComiRec's and DimeRec's "closest interest"; no gradient
through the choice).

The softmax (model option ``softmax``):

``in-batch`` (KuaiFormer's objective, default)
    The positive against the pool of the batch's other targets (and the batch's sampled
    negatives, when it has any), a pool of at most ``pool`` items (a random subset
    centrally when the batch holds more). **logQ correction** (``logq``, Yi et al.,
    RecSys 2019): every logit, the positive's included, is lowered by ``log q(x)``, the
    frequency of ``x`` in the pool, so that popular items, which appear as negatives more
    often, are not over-penalised. ``q`` is counted in the batch itself, so it is local to
    whoever trains on the batch (a federated client counts in its own data). Pool entries
    equal to the positive are masked (accidental hits), duplicates are kept (each copy is a
    sample, which is what ``q`` corrects for). **Label smoothing** ``label-smoothing`` α:
    the positive is weighted ``1 - α`` and the valid pool items share ``α``.
``full``
    Cross-entropy over every item (no logQ), with the same label smoothing over items.

Under the federated engine (one user per slice, ``vmap_safe``) the batch is that user's
sequence: the pool is its own targets plus its sampled negatives, without the random cap
(data-dependent shapes are not allowed there), and the item tables are the user's compact
copies (``in-batch`` only: ``full`` reads every item).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.backbone import ItemEncoder, check_widths
from fedrec.models.base import PUBLIC, ModelData, ParamRole, RecModel

__all__ = ["RetrievalConfig", "RetrievalModel", "softmax_loss", "SwiGLU"]

_SOFTMAX = ("in-batch", "full")


@dataclass
class RetrievalConfig:
    """Options every retrieval model has (see the module docstring)."""

    dim: int = 64
    field_dim: int = 8
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    max_len: int = 50
    item_repr: str = "auto"
    #: user vectors per position (multi-interest); 1 = a single user vector
    interests: int = 1
    softmax: str = "in-batch"
    logq: bool = True
    label_smoothing: float = 0.0
    #: logits are ``<u, x> / temperature``
    temperature: float = 1.0
    #: most items in the in-batch pool (a random subset when the batch holds more)
    pool: int = 2048
    task: str = "next_item"

    def __post_init__(self) -> None:
        check_widths(self, ("dim", "field_dim", "layers", "heads", "max_len", "interests", "pool"))
        if self.softmax not in _SOFTMAX:
            raise ConfigError(f"model option 'softmax' must be one of {', '.join(_SOFTMAX)} (got {self.softmax!r})")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"model option 'label-smoothing' must be in [0, 1) (got {self.label_smoothing})")
        if not self.temperature > 0.0 or self.temperature != self.temperature or self.temperature == float("inf"):
            raise ConfigError(f"model option 'temperature' must be a positive finite number (got {self.temperature})")
        if self.task != "next_item":
            raise ConfigError(f"retrieval models support the next_item task only (got {self.task!r})")


class SwiGLU(nn.Module):
    """Llama's feed-forward part: ``W2 (silu(W1 x) * W3 x)`` with dropout on the output."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., dim) -> (..., dim)``."""
        return self.drop(self.down(F.silu(self.gate(x)) * self.up(x)))


def softmax_loss(query: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, item_vectors, *,
                 softmax: str, n_items: int, temperature: float = 1.0, logq: bool = True,
                 label_smoothing: float = 0.0, pool: int = 2048, negatives: torch.Tensor | None = None,
                 vmap_safe: bool = False, maps: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean over weighted positions of the softmax loss of the module docstring.

    ``query`` ``(B, T, d)`` are the user vectors (the chosen interest), ``targets`` ``(B, T)``
    the positives, ``weight`` ``(B, T)`` (0 where a position does not count),
    ``item_vectors(items, maps)`` maps item indices to ``(..., d)`` vectors. ``negatives``
    ``(B, T, n)``: sampled negatives, added to the in-batch pool.
    """
    alpha = float(label_smoothing)
    count = weight.sum().clamp(min=1.0)
    if softmax == "full":
        if maps is not None:
            raise ValueError("the full softmax reads every item: it cannot run on compact item tables")
        table = item_vectors(torch.arange(n_items + 1, device=query.device), None)
        logits = (query @ table.T) / temperature  # (B, T, n + 1)
        pad = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        pad[0] = True
        logp = torch.log_softmax(logits.masked_fill(pad, float("-inf")), dim=-1)
        nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if alpha:
            nll = (1 - alpha) * nll - alpha * logp[..., 1:].mean(-1)
        # padded targets (item 0) have log-probability -inf: zero them, not 0 * inf
        return torch.where(weight > 0, nll * weight, torch.zeros_like(nll)).sum() / count
    if softmax != "in-batch":
        raise ValueError(f"unknown softmax {softmax!r}")
    ids = [targets.reshape(-1)]
    valid = [weight.reshape(-1) > 0]
    if negatives is not None:
        ids.append(negatives.reshape(-1))
        valid.append(negatives.reshape(-1) != 0)
    pool_ids, pool_valid = torch.cat(ids), torch.cat(valid)
    if not vmap_safe:
        pool_ids = pool_ids[pool_valid]
        if pool_ids.numel() > pool:
            pool_ids = pool_ids[torch.randperm(pool_ids.numel(), device=pool_ids.device)[:pool]]
        pool_valid = torch.ones_like(pool_ids, dtype=torch.bool)
    pool_vec = item_vectors(pool_ids, maps)  # (P, d)
    s_pool = (query @ pool_vec.T) / temperature  # (B, T, P)
    s_pos = (query * item_vectors(targets, maps)).sum(-1) / temperature  # (B, T)
    if logq:
        n_valid = pool_valid.sum().clamp(min=1).to(query.dtype)
        if vmap_safe:
            counts = ((pool_ids[:, None] == pool_ids[None, :]) & pool_valid[None, :]).sum(-1)
        else:
            _, inverse, uniq_counts = torch.unique(pool_ids, return_inverse=True, return_counts=True)
            counts = uniq_counts[inverse]
        s_pool = s_pool - torch.log(counts.clamp(min=1).to(query.dtype) / n_valid)
        pos_counts = ((targets.unsqueeze(-1) == pool_ids) & pool_valid).sum(-1)
        s_pos = s_pos - torch.log(pos_counts.clamp(min=1).to(query.dtype) / n_valid)
    hit = (pool_ids == targets.unsqueeze(-1)) | ~pool_valid  # (B, T, P): not a negative
    logits = torch.cat([s_pos.unsqueeze(-1), s_pool.masked_fill(hit, float("-inf"))], dim=-1)
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp[..., 0]
    if alpha:
        n_neg = (~hit).sum(-1)
        neg_mean = logp[..., 1:].masked_fill(hit, 0.0).sum(-1) / n_neg.clamp(min=1).to(logp.dtype)
        nll = torch.where(n_neg > 0, (1 - alpha) * nll - alpha * neg_mean, nll)
    return torch.where(weight > 0, nll * weight, torch.zeros_like(nll)).sum() / count


class RetrievalModel(RecModel):
    """Base of the retrieval models: subclasses give :meth:`user_vectors` (and may override
    :meth:`item_vectors`, :meth:`auxiliary_loss`, :meth:`serving_vectors`).

    ``forward(batch, mode)`` modes, as the trainers use them: ``train`` (scores of the
    targets with the closest interest, ``logits`` ``(B, T)``), ``loss`` (``(loss,
    outputs)``), ``candidates`` and ``all`` (scores at the last position).
    """

    tasks = ("next_item",)
    #: set by the federated engine: no data-dependent shapes in the loss
    vmap_safe: bool = False

    def __init__(self, data: ModelData, cfg: RetrievalConfig) -> None:
        super().__init__()
        self.cfg, self.data = cfg, data
        self.items = ItemEncoder(data, cfg)

    # -- to override ------------------------------------------------------------------
    def user_vectors(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """``(B, T, K, d)`` user vectors at every position, an optional ``(B, T)`` boolean of
        positions that can be trained (None: all), and extra outputs for the loss."""
        raise NotImplementedError

    def item_vectors(self, items: torch.Tensor, maps: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Item indices -> ``(..., d)`` vectors that user vectors are scored against."""
        return self.items(items, maps)

    def serving_vectors(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, K, d)``: the user vectors that score items after the last position."""
        reps, _, _ = self.user_vectors({**batch, "last_only": True})
        return reps[:, -1]

    def auxiliary_loss(self, batch: dict[str, torch.Tensor], out: dict[str, Any]) -> torch.Tensor:
        """Extra loss terms (default none)."""
        return out["query"].new_zeros(())

    # -- shared -----------------------------------------------------------------------
    def _check_len(self, items: torch.Tensor) -> None:
        if items.shape[1] > self.cfg.max_len:
            raise ConfigError(f"sequence length {items.shape[1]} exceeds the model's max_len {self.cfg.max_len}")

    def forward(self, batch: dict[str, torch.Tensor], mode: str = "train") -> Any:
        """See the class docstring."""
        if "item_maps" in batch and mode in ("candidates", "all"):
            raise ValueError("compact item tables (batch['item_maps']) serve training only, not scoring")
        if mode == "loss":
            out = self.forward(batch)
            return self.loss(batch, out), out
        if mode == "candidates":
            return self.score_candidates(batch, batch["candidates"])
        if mode == "all":
            return self.score_all(batch)
        if mode != "train":
            raise ValueError(f"unknown forward mode {mode!r}")
        self._check_len(batch["items"])
        maps = batch.get("item_maps")
        reps, trainable, extra = self.user_vectors(batch)  # (B, T, K, d)
        target = self.item_vectors(batch["target_items"], maps)  # (B, T, d)
        scores = (reps * target.unsqueeze(2)).sum(-1)  # (B, T, K)
        best = scores.detach().argmax(-1)  # (B, T)
        query = reps.gather(2, best[..., None, None].expand(-1, -1, 1, reps.shape[-1])).squeeze(2)
        weight = batch["target_mask"]
        if trainable is not None:
            weight = weight & trainable
        return {"logits": scores.gather(-1, best.unsqueeze(-1)).squeeze(-1) / self.cfg.temperature,
                "query": query, "reps": reps, "weight": weight, "interest": best,
                "context": {"routing": []}, **extra}

    def loss(self, batch: dict[str, torch.Tensor], out: dict[str, Any]) -> torch.Tensor:
        """The softmax loss (module docstring) plus :meth:`auxiliary_loss`."""
        cfg = self.cfg
        main = softmax_loss(out["query"], batch["target_items"], out["weight"].to(out["query"].dtype),
                            self.item_vectors, softmax=cfg.softmax, n_items=self.data.n_items,
                            temperature=cfg.temperature, logq=cfg.logq, label_smoothing=cfg.label_smoothing,
                            pool=cfg.pool, negatives=batch.get("negatives"), vmap_safe=self.vmap_safe,
                            maps=batch.get("item_maps"))
        return main + self.auxiliary_loss(batch, out)

    def score_candidates(self, batch: dict[str, torch.Tensor], candidates: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` scores ``max_k <u_k, x>`` of candidate items after the last position."""
        self._check_len(batch["items"])
        u = self.serving_vectors(batch)  # (B, K, d)
        x = self.item_vectors(candidates)  # (B, C, d)
        return torch.einsum("bkd,bcd->bkc", u, x).max(dim=1).values

    def score_all(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, n_items + 1)`` scores of every item (column 0 = padding)."""
        self._check_len(batch["items"])
        u = self.serving_vectors(batch)
        table = self.item_vectors(torch.arange(self.data.n_items + 1, device=u.device))
        return torch.einsum("bkd,nd->bkn", u, table).max(dim=1).values

    def parameter_roles(self) -> dict[str, ParamRole]:
        """Every parameter is public (no per-user state)."""
        return {name: PUBLIC for name, _ in self.named_parameters()}

    def item_tables(self) -> dict[str, tuple[str, torch.Tensor | None]] | None:
        """The item tables (compact per-user copies in the federated engine) when the
        softmax reads only the batch's items; None with the full softmax."""
        if self.cfg.softmax == "full":
            return None
        return self.items.tables("items.")
