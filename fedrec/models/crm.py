"""CRM — a two-tower retriever whose user tower takes a regression target as its condition.

Chi Liu, Jiangxia Cao, Rui Huang, Kuo Cai, Weifeng Ding, Qiang Luo, Kun Gai, Guorui Zhou.
"CRM: Retrieval Model with Controllable Condition", arXiv:2412.13844, 2024.

Retrieval models see no candidate at query time, so they are trained on classification
targets only, while the ranker also optimises regression targets (watch time). CRM feeds
the regression target to the *user* tower as a condition ``c``: trained on the observed
value of each positive, the model learns ``p(item | user, c)``, "which items does this user
consume *this much*", and at serving time the condition is chosen (``../shared/reference/
seed_baselines.md`` section 1).

What is kept:

* **User tower** ``u_t = MLP([h_t ; e(c)])``: ``h_t`` the output of a causal Transformer
  over the history (pre-LayerNorm SASRec blocks; with ``history-conditions`` each history
  token also carries the embedding of its own observed value), ``e(c)`` the condition
  embedding. **Item tower**: the item representation
  (:class:`~fedrec.models.backbone.ItemEncoder`: id and/or attribute embeddings). Score
  ``<u, v>``; in-batch softmax with logQ correction (:mod:`fedrec.models.retrieval`).
* **Training condition**: the observed value of the positive that follows each position
  (the batch's ``target_ratings`` / ``target_values``).
* **Serving condition** (``serve``), from the user's own history values: ``mean``, ``max``,
  ``min``, ``median``, ``last``, or a fixed number (e.g. ``5``); a comma-separated list
  (e.g. ``mean,max``) issues one request per condition and merges them, each item scored by
  its best request (the paper's time-division multiplexing, merged by score).

Choices where the paper is silent (documented):

* **The condition column** (``condition``): ``rating`` or ``value`` (a watch-time-like
  field); ``auto`` takes ``value`` when the data has it, else ``rating``. Data with neither
  is refused when the model is built.
* **Condition embedding**: ``e(c) = MLP(log1p(max(c, 0)))`` — continuous, so it needs no
  bucket edges (bucket edges computed from the data would depend on other users, which a
  federated client may not see); ``log1p`` tames watch-time tails and keeps ratings ordered.
* The Decision-Transformer variant (interleaved watch-time-to-go tokens) is not built.
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
from fedrec.models.retrieval import RetrievalConfig, RetrievalModel

__all__ = ["CRMConfig", "CRM", "parse_serve"]

_CONDITIONS = ("auto", "rating", "value")
_STATS = ("mean", "max", "min", "median", "last")


def parse_serve(spec: Any) -> tuple[str | float, ...]:
    """``"mean,max"`` -> ``("mean", "max")``; numbers become floats (``"5"`` -> ``(5.0,)``)."""
    terms = [t.strip().lower() for t in str(spec).split(",")]
    out: list[str | float] = []
    for term in terms:
        if term in _STATS:
            out.append(term)
            continue
        try:
            value = float(term)
        except ValueError:
            value = float("nan")
        if not math.isfinite(value):
            raise ConfigError(f"model option 'serve' must be a comma-separated list of {', '.join(_STATS)} or finite "
                              f"numbers (got {spec!r})")
        out.append(value)
    return tuple(out)


@dataclass
class CRMConfig(RetrievalConfig):
    """CRM's options (module docstring)."""

    #: which per-row column is the condition: auto (value, else rating), rating, value
    condition: str = "auto"
    #: the serving condition(s): mean, max, min, median, last or a number; a list merges requests
    serve: str = "mean"
    #: history tokens also carry the embedding of their own observed value
    history_conditions: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.condition not in _CONDITIONS:
            raise ConfigError(f"model option 'condition' must be one of {', '.join(_CONDITIONS)} (got {self.condition!r})")
        if self.interests != 1:
            raise ConfigError("model option 'interests' does not apply to CRM: its user vectors are one per serving "
                              "condition (option 'serve')")
        parse_serve(self.serve)


class _Block(nn.Module):
    """Pre-LayerNorm causal self-attention + position-wise FFN (SASRec's block)."""

    def __init__(self, cfg: CRMConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = SelfAttention(cfg.dim, cfg.heads, dropout=cfg.dropout, causal=True)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.ffn = PositionwiseFFN(cfg.dim, cfg.dim, dropout=cfg.dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """``(B, T, dim)`` -> ``(B, T, dim)``."""
        q = self.norm1(x)
        x = q + self.attn(x, padding, query=q)
        z = self.norm2(x)
        return (z + self.ffn(z)) * (~padding).unsqueeze(-1).to(x.dtype)


class CRM(RetrievalModel):
    """CRM (module docstring)."""

    def __init__(self, data: ModelData, cfg: CRMConfig) -> None:
        super().__init__(data, cfg)
        have = tuple(getattr(data, "value_columns", ()))
        column = cfg.condition
        if column == "auto":
            column = "value" if "value" in have else "rating"
        if column not in have:
            raise ConfigError(f"model 'crm' conditions on a per-interaction value: the data has no '{column}' column "
                              f"(it has: {', '.join(have) or 'neither rating nor value'})")
        self.column = column
        self.key = {"rating": "ratings", "value": "values"}[column]
        self.serve = parse_serve(cfg.serve)
        d = cfg.dim
        self.positions = nn.Embedding(cfg.max_len, d)
        self.condition_mlp = nn.Sequential(nn.Linear(1, d), nn.SiLU(), nn.Linear(d, d))
        if cfg.history_conditions:
            self.history_mlp = nn.Sequential(nn.Linear(1, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(d)
        self.tower = nn.Sequential(nn.Linear(2 * d, 2 * d), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(2 * d, d))
        self.drop = nn.Dropout(cfg.dropout)

    @staticmethod
    def _scaled(values: torch.Tensor) -> torch.Tensor:
        """``log1p(max(c, 0))`` with NaN (padding) as 0, shape ``(..., 1)``."""
        v = torch.nan_to_num(values, nan=0.0).clamp(min=0.0)
        return torch.log1p(v).unsqueeze(-1)

    def _values(self, batch: dict[str, torch.Tensor], key: str) -> torch.Tensor:
        if key not in batch:
            raise ConfigError(f"model 'crm' needs the batch's '{key}' (the data's '{self.column}' column)")
        return batch[key]

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, T, d)``: the history encoding ``h_t`` at every position."""
        items = batch["items"]
        T = items.shape[1]
        x = self.items(items, batch.get("item_maps")) * math.sqrt(self.cfg.dim)
        padding = items == 0
        if self.cfg.history_conditions:
            x = x + self.history_mlp(self._scaled(self._values(batch, self.key)))
        x = x + self.positions.weight[-T:].unsqueeze(0)
        h = self.drop(x) * (~padding).unsqueeze(-1).to(x.dtype)
        for block in self.blocks:
            h = block(h, padding)
        return self.final_norm(h)

    def condition_vectors(self, h: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """``h`` ``(B, T, d)`` and raw conditions ``(B, T, K)`` -> user vectors ``(B, T, K, d)``."""
        e = self.condition_mlp(self._scaled(conditions))  # (B, T, K, d)
        hk = h.unsqueeze(2).expand(-1, -1, e.shape[2], -1)
        return self.tower(torch.cat([hk, e], dim=-1))

    def serving_conditions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, K)``: the condition of each serving request (option ``serve``) from each
        user's own history values (a user without any history value gets 0)."""
        values = self._values(batch, self.key)
        real = (batch["items"] != 0) & ~torch.isnan(values)
        v = torch.where(real, values, torch.zeros_like(values))
        n = real.sum(1)
        out = []
        for term in self.serve:
            if isinstance(term, float):
                c = torch.full((values.shape[0],), term, dtype=values.dtype, device=values.device)
            elif term == "mean":
                c = v.sum(1) / n.clamp(min=1)
            elif term == "max":
                c = torch.where(real, values, torch.full_like(values, -math.inf)).max(1).values
            elif term == "min":
                c = torch.where(real, values, torch.full_like(values, math.inf)).min(1).values
            elif term == "median":
                c = torch.where(real, values, torch.full_like(values, math.nan)).nanmedian(1).values
            else:  # last: the newest real value (histories are left-padded)
                pos = torch.arange(values.shape[1], device=values.device).expand_as(values)
                idx = torch.where(real, pos, torch.full_like(pos, -1)).max(1).values.clamp(min=0)
                c = v.gather(1, idx.unsqueeze(1)).squeeze(1)
            if not isinstance(term, float):  # a statistic of no history is 0
                c = torch.where(n > 0, torch.nan_to_num(c, nan=0.0, posinf=0.0, neginf=0.0), torch.zeros_like(c))
            out.append(c)
        return torch.stack(out, dim=1)

    def user_vectors(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """Training: the user vector at every position under its target's observed value."""
        h = self.encode(batch)
        conditions = self._values(batch, "target_" + self.key).unsqueeze(-1)  # (B, T, 1)
        return self.condition_vectors(h, conditions), None, {}

    def serving_vectors(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, K, d)``: one user vector per serving condition after the last position."""
        h = self.encode(batch)[:, -1:]  # (B, 1, d)
        return self.condition_vectors(h, self.serving_conditions(batch).unsqueeze(1))[:, 0]
