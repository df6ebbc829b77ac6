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

**The Decision-Transformer variant** (``tower = "dt"``, CRM-DT; the default ``tower =
"concat"`` is the model above). The paper's Transformer variant borrows the Decision
Transformer layout (Chen et al., NeurIPS 2021): per step, a *value-to-go* token (the analogue
of return-to-go: the watch time, or rating, still to come) and the item token, interleaved;
the model predicts the next item at the to-go token. Here, for a window of history items
``x_1..x_T`` whose targets (the item after each) are ``y_1..y_T`` with observed values
``v_1..v_T``:

* **Tokens** ``[x_1, g_1, x_2, g_2, ..., x_T, g_T]``: ``x_t`` the item representation,
  ``g_t = MLP(log1p(G_t))`` the to-go embedding; both tokens of step ``t`` share its
  (right-aligned) position embedding, and a token-type embedding tells them apart. The first
  step has no to-go token before its item: the batch has no target for ``x_1``.
* **Causality**: one causal mask over the ``2T`` tokens (the SASRec blocks above), so the
  output at ``g_t`` sees ``x_1..x_t`` and ``g_1..g_t`` only — the earlier items and its own
  and earlier to-gos, never ``x_{t+1}`` (tested). That output, after the final LayerNorm, is
  the user vector that retrieves ``y_t``.
* **Value-to-go** (``to-go``; the paper's exact definition is not known to us): ``sum``
  (default, as return-to-go) ``G_t = v_t + v_{t+1} + ... + v_T``, the total value of the
  window's remaining steps; ``mean`` ``G_t = (v_t + ... + v_T) / (T - t + 1)``, the mean value
  per remaining step (on the scale of one value, whatever the position). Steps whose value is
  missing (padding, NaN) count neither in the sum nor in the mean. At the last step both are
  ``v_T``: one step remains.
* **Serving**: the window is the training window in which the next, not yet known item has
  the served value ``c`` (option ``serve``: the user's ``mean``, ``max``, ..., a fixed number;
  each request of a list is its own forward pass). So the last to-go token holds ``c``
  itself — one step remains — and each history step's to-go is its hindsight ``G_t`` over the
  history's observed values followed by ``c`` (for ``sum``: the values of the history items
  after step ``t`` plus ``c``). The targets' own values (the held-out one) are never read.
* **Item tokens** carry no value of their own (``history-conditions`` is false by default
  under ``dt``; true adds each item's own observed value to its token, as in ``concat``).
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

__all__ = ["CRMConfig", "CRM", "parse_serve", "value_to_go"]

_CONDITIONS = ("auto", "rating", "value")
_STATS = ("mean", "max", "min", "median", "last")
_TOWERS = ("concat", "dt")
_TO_GO = ("sum", "mean")


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


def value_to_go(values: torch.Tensor, real: torch.Tensor, mode: str) -> torch.Tensor:
    """The value-to-go of every step of a window (CRM-DT, module docstring).

    ``values`` ``(..., T)`` are the steps' observed values, ``real`` ``(..., T)`` True where a
    step has one (not padding, not NaN). ``sum``: ``G_t = sum_{s >= t} v_s`` over real steps;
    ``mean``: that sum over the number of real steps from ``t`` on (0 where there is none).
    """
    if mode not in _TO_GO:
        raise ValueError(f"unknown to-go {mode!r}")
    v = torch.where(real, torch.nan_to_num(values, nan=0.0), torch.zeros_like(values))
    total = v.flip(-1).cumsum(-1).flip(-1)
    if mode == "sum":
        return total
    count = real.to(values.dtype).flip(-1).cumsum(-1).flip(-1)
    return torch.where(count > 0, total / count.clamp(min=1.0), torch.zeros_like(total))


@dataclass
class CRMConfig(RetrievalConfig):
    """CRM's options (module docstring)."""

    #: which per-row column is the condition: auto (value, else rating), rating, value
    condition: str = "auto"
    #: the serving condition(s): mean, max, min, median, last or a number; a list merges requests
    serve: str = "mean"
    #: history (item) tokens also carry the embedding of their own observed value (default:
    #: true with the concat tower, false with dt)
    history_conditions: bool | None = None
    #: the user tower: concat (MLP over [history encoding ; condition]) or dt (interleaved
    #: value-to-go and item tokens, the paper's Decision-Transformer variant)
    tower: str = "concat"
    #: dt only: the value-to-go of a step, sum (of the remaining steps' values; default) or mean
    to_go: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tower not in _TOWERS:
            raise ConfigError(f"model option 'tower' must be one of {', '.join(_TOWERS)} (got {self.tower!r})")
        if self.tower == "dt":
            if self.to_go is None:
                self.to_go = "sum"
            if self.to_go not in _TO_GO:
                raise ConfigError(f"model option 'to-go' must be one of {', '.join(_TO_GO)} (got {self.to_go!r})")
        elif self.to_go is not None:
            raise ConfigError(f"model option 'to-go' applies to tower = \"dt\" only (got to-go = {self.to_go!r} "
                              f"with tower = {self.tower!r})")
        if self.history_conditions is None:
            self.history_conditions = self.tower == "concat"
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
        if cfg.tower == "dt":
            #: token types: 0 the item token, 1 the value-to-go token of a step
            self.token_types = nn.Embedding(2, d)
        else:
            self.tower = nn.Sequential(nn.Linear(2 * d, 2 * d), nn.GELU(), nn.Dropout(cfg.dropout),
                                       nn.Linear(2 * d, d))
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

    def _item_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, T, d)``: the history's item tokens (with their own values under
        ``history-conditions``) and position embeddings."""
        items = batch["items"]
        x = self.items(items, batch.get("item_maps")) * math.sqrt(self.cfg.dim)
        if self.cfg.history_conditions:
            x = x + self.history_mlp(self._scaled(self._values(batch, self.key)))
        return x + self.positions.weight[-items.shape[1]:].unsqueeze(0)

    def _run_blocks(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = self.drop(x) * (~padding).unsqueeze(-1).to(x.dtype)
        for block in self.blocks:
            h = block(h, padding)
        return self.final_norm(h)

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, T, d)``: the history encoding ``h_t`` at every position (``concat`` tower)."""
        return self._run_blocks(self._item_tokens(batch), batch["items"] == 0)

    def encode_dt(self, batch: dict[str, torch.Tensor], to_go: torch.Tensor) -> torch.Tensor:
        """CRM-DT: ``(B, T, d)``, the output at every step's value-to-go token.

        ``to_go`` ``(B, T)``: the value-to-go ``G_t`` of each step (:func:`value_to_go`). The
        tokens ``[x_1, g_1, ..., x_T, g_T]`` run through the causal blocks; the output at
        ``g_t`` sees ``x_1..x_t`` and ``g_1..g_t`` only.
        """
        items = batch["items"]
        B, T = items.shape
        x = self._item_tokens(batch) + self.token_types.weight[0]
        g = (self.condition_mlp(self._scaled(to_go)) + self.positions.weight[-T:].unsqueeze(0)
             + self.token_types.weight[1])
        tokens = torch.stack([x, g], dim=2).reshape(B, 2 * T, -1)  # x_1, g_1, x_2, g_2, ...
        padding = (items == 0).repeat_interleave(2, dim=1)  # a padded step pads both its tokens
        return self._run_blocks(tokens, padding)[:, 1::2]

    def serving_to_go(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """CRM-DT: ``(B, K, T)``, the value-to-go of every step under each serving condition.

        The step values are the history's own values shifted by one (step ``t``'s target is
        history item ``t + 1``) followed by the served condition ``c`` for the next item, so
        the last step's to-go is ``c`` itself. The batch's target values are never read.
        """
        values = self._values(batch, self.key)
        real = (batch["items"] != 0) & ~torch.isnan(values)
        c = self.serving_conditions(batch)  # (B, K)
        K = c.shape[1]
        step = torch.cat([values[:, 1:].unsqueeze(1).expand(-1, K, -1), c.unsqueeze(-1)], dim=-1)  # (B, K, T)
        step_real = torch.cat([real[:, 1:], torch.ones_like(real[:, :1])], dim=1).unsqueeze(1).expand(-1, K, -1)
        return value_to_go(step, step_real, self.cfg.to_go)

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
        """Training: the user vector at every position under its target's observed value
        (``dt``: under the value-to-go of the window's targets from that position on)."""
        targets = self._values(batch, "target_" + self.key)
        if self.cfg.tower == "dt":
            real = (batch["target_items"] != 0) & ~torch.isnan(targets)
            return self.encode_dt(batch, value_to_go(targets, real, self.cfg.to_go)).unsqueeze(2), None, {}
        h = self.encode(batch)
        return self.condition_vectors(h, targets.unsqueeze(-1)), None, {}

    def serving_vectors(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, K, d)``: one user vector per serving condition after the last position."""
        if self.cfg.tower == "dt":
            to_go = self.serving_to_go(batch)  # (B, K, T)
            B, K, T = to_go.shape
            wide = {key: batch[key].repeat_interleave(K, dim=0) for key in ("items", self.key)}
            return self.encode_dt(wide, to_go.reshape(B * K, T))[:, -1].reshape(B, K, -1)
        h = self.encode(batch)[:, -1:]  # (B, 1, d)
        return self.condition_vectors(h, self.serving_conditions(batch).unsqueeze(1))[:, 0]
