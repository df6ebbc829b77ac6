"""The user's smoothed click rate — the CTR baseline a personalised model must clear.

Predicts ``(clicks_u + m * global_rate) / (impressions_u + m)`` from the user's training
impressions, ``m`` chosen on validation. On KuaiSAR-R it reaches test AUC about 0.69
(reference notes), a bar MRFF must clear clearly.
"""

from __future__ import annotations

from fedrec.models.base import ModelData
from fedrec.models.baselines import CountingBaseline

__all__ = ["UserCTR"]


class UserCTR(CountingBaseline):
    """Smoothed per-user click rate (CTR task only)."""

    key = "user"
    tasks = ("ctr",)

    def __init__(self, data: ModelData, cfg=None) -> None:
        super().__init__(data, data.n_users)
