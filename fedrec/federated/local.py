"""Local-only training: every user trains its own copy of the model on its own data and
nothing is shared — the lower bound federation must beat.

Every parameter is private: a shard keeps one full model per user (stacked), and uploads
are empty (only counts travel, so the server can still follow progress).
"""

from __future__ import annotations

from fedrec.federated.algorithm import Algorithm
from fedrec.models.base import PRIVATE, ParamRole, RecModel

__all__ = ["LocalOnly"]


class LocalOnly(Algorithm):
    """Each user alone; default model ``sasrec``."""

    name = "local"
    default_model = "sasrec"

    def roles(self, model: RecModel) -> dict[str, ParamRole]:
        """Per-user tables stay per-user; everything else becomes private too."""
        return {n: (r if r.kind == "private" else PRIVATE) for n, r in model.parameter_roles().items()}
