"""Item popularity — the trivial baseline every results table shows.

CTR: the item's smoothed training click rate (the prior strength chosen on validation).
Next item: the item's number of training interactions (most popular first).
"""

from __future__ import annotations

import torch

from fedrec.models.base import ModelData
from fedrec.models.baselines import CountingBaseline

__all__ = ["Popularity"]


class Popularity(CountingBaseline):
    """Item popularity (see the module docstring)."""

    key = "item"
    tasks = ("ctr", "next_item")

    def __init__(self, data: ModelData, cfg=None) -> None:
        super().__init__(data, data.n_items)

    def score_candidates(self, batch, candidates: torch.Tensor) -> torch.Tensor:
        """Training interaction count of each candidate."""
        return self.impressions[candidates].float()

    def score_all(self, batch) -> torch.Tensor:
        """Training interaction count of every item, for each row of the batch."""
        return self.impressions.float().unsqueeze(0).expand(batch["user"].shape[0], -1).clone()
