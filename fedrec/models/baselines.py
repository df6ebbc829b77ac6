"""Shared machinery of the counting baselines (no gradient training): fit on the training
split, choose the smoothing strength on the validation split, then score."""

from __future__ import annotations

import numpy as np
import torch

from fedrec.data.split import TRAIN, VALID, SplitData
from fedrec.metrics import auc
from fedrec.models.base import ModelData, RecModel

__all__ = ["CountingBaseline", "PRIORS"]

#: candidate smoothing strengths (pseudo-impressions at the global click rate)
PRIORS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)


class CountingBaseline(RecModel):
    """A baseline that counts training clicks per key (item or user) and predicts the
    smoothed click rate ``(clicks + m * global_rate) / (impressions + m)``.

    ``m`` is chosen among :data:`PRIORS` by validation AUC (CTR data); the counts live in
    buffers so ``state_dict`` round-trips. Subclasses set :attr:`key` (``"item"`` or
    ``"user"``) and the size of the key space.
    """

    trainable = False
    key = "item"

    def __init__(self, data: ModelData, size: int) -> None:
        super().__init__()
        self.register_buffer("clicks", torch.zeros(size + 1, dtype=torch.float64))
        self.register_buffer("impressions", torch.zeros(size + 1, dtype=torch.float64))
        self.register_buffer("global_rate", torch.tensor(0.5, dtype=torch.float64))
        self.register_buffer("prior", torch.tensor(PRIORS[0], dtype=torch.float64))

    def _keys(self, split: SplitData, rows: np.ndarray) -> np.ndarray:
        return split.item[rows] if self.key == "item" else split.row_user[rows]

    def _rate(self, keys: torch.Tensor, prior: float | torch.Tensor | None = None) -> torch.Tensor:
        m = self.prior if prior is None else prior
        return (self.clicks[keys] + m * self.global_rate) / (self.impressions[keys] + m)

    def fit(self, split: SplitData) -> dict[str, float]:
        """Count training rows; pick the prior by validation AUC. Returns the AUC per prior."""
        train = np.flatnonzero(split.part == TRAIN)
        keys = torch.from_numpy(self._keys(split, train))
        labels = torch.from_numpy(split.label[train].astype(np.float64))
        self.clicks.zero_().index_add_(0, keys, labels)
        self.impressions.zero_().index_add_(0, keys, torch.ones_like(labels))
        self.global_rate.fill_(float(labels.mean()))
        valid = np.flatnonzero(split.part == VALID)
        scores = {}
        if split.has_labels and len(np.unique(split.label[valid])) == 2:
            vkeys = torch.from_numpy(self._keys(split, valid))
            for m in PRIORS:
                scores[m] = auc(split.label[valid], self._rate(vkeys, m).numpy())
            self.prior.fill_(max(scores, key=scores.get))
        return scores

    def forward(self, batch):
        """Scores at every target position (``logits`` are probabilities' log-odds)."""
        keys = batch["target_items"] if self.key == "item" else batch["user"].unsqueeze(1).expand_as(batch["target_items"])
        p = self._rate(keys).clamp(1e-6, 1 - 1e-6)
        return {"logits": torch.log(p / (1 - p)).float()}

    def predict_ctr(self, batch):
        """Smoothed click rate of the held-out impression's key."""
        return torch.sigmoid(self.forward(batch)["logits"][:, -1])

    def predict_ctr_candidates(self, batch, candidates: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` smoothed click rates of ``candidates`` (``(C,)`` or ``(B, C)``) as the
        next impression: :meth:`predict_ctr` with each candidate as the held-out target."""
        users = batch["user"]
        targets = candidates.expand(users.shape[0], -1) if candidates.dim() == 1 else candidates
        return torch.sigmoid(self.forward({"user": users, "target_items": targets})["logits"])
