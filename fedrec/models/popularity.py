"""Item popularity — the trivial baseline every results table shows.

CTR: the item's smoothed training click rate (the prior strength chosen on validation).
Next item and cross-domain (``cdr``): the item's number of training interactions (most popular
first; on cross-domain data full ranking is within the row's domain).
"""

from __future__ import annotations

import torch

from fedrec.models.base import ModelData
from fedrec.models.baselines import CountingBaseline

__all__ = ["Popularity"]


class Popularity(CountingBaseline):
    """Item popularity (see the module docstring)."""

    key = "item"
    tasks = ("ctr", "next_item", "cdr")

    def __init__(self, data: ModelData, cfg=None) -> None:
        super().__init__(data, data.n_items)
        self._item_domain = data.item_domain

    def score_candidates(self, batch, candidates: torch.Tensor) -> torch.Tensor:
        """Training interaction count of each candidate."""
        return self.impressions[candidates].float()

    def score_all(self, batch) -> torch.Tensor:
        """Training interaction count of every item, for each row of the batch (cross-domain:
        ``-inf`` for the items of other domains than the row's)."""
        scores = self.impressions.float().unsqueeze(0).expand(batch["user"].shape[0], -1).clone()
        if self._item_domain is not None and "domain" in batch and (batch["domain"] >= 0).all():
            other = self._item_domain.unsqueeze(0) != batch["domain"].unsqueeze(1)
            scores = scores.masked_fill(other, float("-inf"))
        return scores
