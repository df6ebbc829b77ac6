"""What every model shares: the data facts a model is built from, parameter roles, and the
model interface the trainers (centralised and federated) rely on.

Parameter roles (read by aggregation, upload size, DP clipping and checkpointing):

``public``
    Averaged over all participants.
``group(layer, g)``
    Averaged over the users routed to group ``g`` at ``layer``; untouched when nobody chose it.
``aligned``
    A table indexed by users that several clients hold (cross-domain transfer: the shared
    user table): each client uploads the rows of its common users, each with its own
    weight, and the server averages every row over the clients that sent it.
``private``
    Never leaves the client. Per-user private tensors are stacked with the user index as
    their first dimension (row 0 = padding user), so a shard of many users is one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedrec.data.split import SplitData

__all__ = ["ParamRole", "PUBLIC", "PRIVATE", "PRIVATE_PER_USER", "ALIGNED", "group_role", "ModelData", "RecModel"]


@dataclass(frozen=True)
class ParamRole:
    """The role of one parameter: ``kind`` in {public, group, aligned, private}; ``layer``/``group``
    for group parameters; ``per_user`` for private tensors stacked by user index."""

    kind: str
    layer: int | None = None
    group: int | None = None
    per_user: bool = False

    def __str__(self) -> str:
        if self.kind == "group":
            return f"group({self.layer}, {self.group})"
        return self.kind + ("[per-user]" if self.per_user else "")


PUBLIC = ParamRole("public")
PRIVATE = ParamRole("private")
PRIVATE_PER_USER = ParamRole("private", per_user=True)
ALIGNED = ParamRole("aligned")


def group_role(layer: int, g: int) -> ParamRole:
    """The role of group ``g``'s parameters at ``layer``."""
    return ParamRole("group", layer=layer, group=g)


@dataclass(frozen=True)
class ModelData:
    """The facts about the data a model is built from (no interactions).

    ``user_features`` / ``item_features`` are ``(n + 1, F)`` integer code tensors aligned
    with the indices (row 0 = padding) or ``None``; ``*_cardinalities`` give, per field, the
    number of codes (max code + 1).
    """

    n_users: int
    n_items: int
    has_labels: bool
    user_features: torch.Tensor | None
    item_features: torch.Tensor | None
    user_cardinalities: tuple[int, ...]
    item_cardinalities: tuple[int, ...]
    #: domain names (empty on single-domain data) and ``(n_items + 1,)`` domain index of
    #: every item (-1 for padding; None on single-domain data)
    domains: tuple[str, ...] = ()
    item_domain: torch.Tensor | None = None
    #: the per-row value columns the data has (``"rating"``, ``"value"``): what batches carry
    #: as ``ratings`` / ``values`` (CRM's condition)
    value_columns: tuple[str, ...] = ()

    @classmethod
    def from_split(cls, split: SplitData) -> "ModelData":
        """Facts of ``split``."""

        def table(arr):
            if arr is None:
                return None, ()
            return torch.from_numpy(np.ascontiguousarray(arr)), tuple(int(c) + 1 for c in arr.max(axis=0))

        uf, uc = table(split.user_features)
        itf, ic = table(split.item_features)
        if split.user_cardinalities is not None:  # a node's split: the catalogue's schema
            uc = tuple(split.user_cardinalities)
        item_domain = torch.from_numpy(np.asarray(split.item_domain, dtype=np.int64)) if split.domains else None
        columns = tuple(c for c in ("rating", "value") if getattr(split, c, None) is not None)
        return cls(split.n_users, split.n_items, split.has_labels, uf, itf, uc, ic, tuple(split.domains), item_domain,
                   columns)


def _apply_plain(value, fn):
    """``fn`` applied to a plain tensor attribute (or the tensors of a list / tuple of them,
    one level deep); anything else is returned as it is."""
    if isinstance(value, nn.Parameter):
        return value
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, (list, tuple)) and value and any(torch.is_tensor(v) or isinstance(v, (list, tuple))
                                                             for v in value):
        return type(value)(_apply_plain(v, fn) if not isinstance(v, (list, tuple))
                           else type(v)(fn(x) if torch.is_tensor(x) else x for x in v) for v in value)
    return value


class RecModel(nn.Module):
    """Base of the neural models.

    A model maps a batch (the dict of tensors built by :mod:`fedrec.data.batching`) to an
    output dict; :meth:`loss` turns it into a scalar; :meth:`predict_ctr` gives click
    probabilities at the target positions (CTR task); :meth:`score_candidates` scores
    ``(B, C)`` candidate items at the last position (next-item task).
    """

    #: the tasks the model supports
    tasks: tuple[str, ...] = ("ctr", "next_item")

    def _apply(self, fn, recurse: bool = True):
        """``.to(device)``, ``.cpu()``, ``.double()`` ... also move the plain tensor
        attributes of the model and its submodules (feature code tables, domain maps, codes
        fitted by ``prepare``: tensors that are neither parameters nor buffers, so that
        they are not saved in ``state_dict``), and those in lists / tuples of them."""
        super()._apply(fn, recurse)
        for m in self.modules():
            if m is not self and isinstance(m, RecModel):
                continue  # a nested model moves its own
            for name, value in list(vars(m).items()):
                if name.startswith("_") and name in ("_parameters", "_buffers", "_modules"):
                    continue
                moved = _apply_plain(value, fn)
                if moved is not value:
                    object.__setattr__(m, name, moved)
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, batch: dict[str, torch.Tensor], out: dict[str, Any]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def predict_ctr(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def score_candidates(self, batch: dict[str, torch.Tensor], candidates: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def predict_ctr_candidates(self, batch: dict[str, torch.Tensor],
                               candidates: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """``(B, C)`` click probabilities of ``candidates`` (``(C,)`` shared by every row, or
        ``(B, C)``) as the impression that follows the batch's last position: for each
        candidate what :meth:`predict_ctr` gives with it as the held-out target (CTR task)."""
        raise NotImplementedError

    def item_tables(self) -> dict[str, tuple[str, torch.Tensor | None]] | None:
        """Parameters that are tables read only through item indices during training: name
        -> ``(key, row_of_item)`` (see :meth:`fedrec.models.backbone.ItemEncoder.tables`).
        The federated engine then trains per-user compact copies of them; the model's
        ``forward`` must accept ``batch["item_maps"]``. Default None: no compact tables."""
        return None

    def parameter_roles(self) -> dict[str, ParamRole]:
        """Role of every named parameter (default: all public)."""
        return {name: PUBLIC for name, _ in self.named_parameters()}

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter name (default: none, all 1)."""
        return {}

    def private_parameters_per_user(self) -> int:
        """Parameters each user holds privately: the width of its row of every per-user
        table (parameters with role ``private`` per user)."""
        roles = self.parameter_roles()
        return int(sum(p[0].numel() for n, p in self.named_parameters() if roles.get(n) == PRIVATE_PER_USER))
