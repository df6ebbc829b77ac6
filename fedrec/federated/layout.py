"""Which parameters travel, and how: a model's parameter roles turned into four name lists.

``shared``
    ``public`` parameters: sent to every client, uploaded as a weighted sum, averaged.
``groups``
    ``group(layer, g)`` parameters: sent to every client; a user uploads only the groups it
    was routed to; each is averaged over the users routed to it (kept when nobody chose it).
``per_user``
    ``private`` tables stacked by user index (row ``u`` belongs to user ``u``): each client
    keeps only its users' rows, never uploaded.
``aligned``
    ``aligned`` tables (rows indexed by users several clients hold, e.g. UniCDR's shared user
    table): the server holds one row per common user; a client uploads only the rows it
    trained, each with a weight, and every row is averaged over the clients that sent it.
``private``
    other ``private`` parameters (e.g. MRFF's user-profile field tables): with one client
    per user, every user owns a full copy; a shard keeps one copy per user. Never uploaded.

The layout is read from :meth:`~fedrec.models.base.RecModel.parameter_roles`; an algorithm
may override roles (e.g. ``local``: everything private).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from fedrec.models.base import ParamRole

__all__ = ["Layout"]


@dataclass(frozen=True)
class Layout:
    """Parameter names by how they travel (see the module docstring)."""

    shared: tuple[str, ...]
    groups: dict[str, tuple[int, int]] = field(default_factory=dict)
    per_user: tuple[str, ...] = ()
    private: tuple[str, ...] = ()
    layers: int = 0
    n_groups: int = 0
    aligned: tuple[str, ...] = ()

    @classmethod
    def from_roles(cls, model: nn.Module, roles: dict[str, ParamRole]) -> "Layout":
        """Layout of ``model`` under ``roles`` (every parameter must have a role)."""
        names = [n for n, _ in model.named_parameters()]
        missing = [n for n in names if n not in roles]
        if missing:
            raise ValueError(f"parameters without a role: {', '.join(missing)}")
        shared, per_user, private, groups, aligned = [], [], [], {}, []
        for n in names:
            role = roles[n]
            if role.kind == "public":
                shared.append(n)
            elif role.kind == "group":
                groups[n] = (int(role.layer), int(role.group))
            elif role.kind == "private":
                (per_user if role.per_user else private).append(n)
            elif role.kind == "aligned":
                aligned.append(n)
            else:
                raise ValueError(f"parameter {n}: unknown role kind {role.kind!r}")
        layers = 1 + max((lg[0] for lg in groups.values()), default=-1)
        n_groups = 1 + max((lg[1] for lg in groups.values()), default=-1)
        return cls(tuple(shared), groups, tuple(per_user), tuple(private), layers, n_groups, tuple(aligned))

    @property
    def global_names(self) -> tuple[str, ...]:
        """Names the server holds and broadcasts: shared, group, then aligned parameters."""
        return self.shared + tuple(self.groups) + self.aligned

    def group_names(self, layer: int, g: int) -> list[str]:
        """Names of group ``g`` at ``layer``."""
        return [n for n, lg in self.groups.items() if lg == (layer, g)]

