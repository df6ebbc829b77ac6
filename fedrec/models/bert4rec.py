"""BERT4Rec — a bidirectional Transformer encoder trained with its cloze objective.

Fei Sun, Jun Liu, Jian Wu, Changhua Pei, Wenwu Ou, Peng Jiang. "BERT4Rec: Sequential
Recommendation with Bidirectional Encoder Representations from Transformer", CIKM 2019.

A bidirectional Transformer encoder (the shared backbone of :mod:`fedrec.models.backbone`
with ``bidirectional=True``) trained on the **cloze task**: in each training window (the
history followed by its last target), every real item is replaced by a learned ``[mask]``
token with probability ``mask-ratio``, and the model predicts the original items at the
masked positions from both sides. At inference a ``[mask]`` token is appended after the
history (the oldest item of a full window drops out) and its output scores the next item.

The loss at the masked positions is the backbone's ``next-loss``: full cross-entropy
(``ce``, the centralised default, which is also what Klenitskiy & Vasilev, RecSys 2023,
found to train BERT4Rec best) or BCE against the batch's sampled negatives (``bce``, the
federated default; a position's negatives were drawn for the batch's target at that
position, which are items outside the user's training history as well).

Choices: mask ratio 0.2 (the paper's best on sparse Amazon data was 0.4-0.6 on Beauty and
0.2 on ML-1M; tune with ``mask-ratio``), no forced masking of the last item, the GELU
feed-forward of the backbone replaced by its ReLU one (the shared block). The pre-cloze
variant (bidirectional encoder trained on the last position only) stays registered as
``bert4rec-last``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.backbone import BackboneConfig, ResidualFFN, SequenceModel
from fedrec.models.base import ModelData

__all__ = ["BERT4RecConfig", "BERT4Rec"]


@dataclass
class BERT4RecConfig(BackboneConfig):
    """The backbone's options plus ``mask_ratio`` (the cloze masking probability)."""

    bidirectional: bool = True
    mask_ratio: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.bidirectional:
            raise ConfigError("BERT4Rec is a bidirectional encoder: model option 'bidirectional' must stay true")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"model option 'mask-ratio' must be in (0, 1) (got {self.mask_ratio})")
        if self.task != "next_item":
            raise ConfigError(f"BERT4Rec (cloze) supports the next_item task only (got {self.task!r})")


class BERT4Rec(SequenceModel):
    """BERT4Rec trained with the cloze task (module docstring)."""

    tasks = ("next_item",)

    def __init__(self, data: ModelData, cfg: BERT4RecConfig) -> None:
        super().__init__(data, cfg, make_ffn=lambda layer: ResidualFFN(cfg))
        self.mask_embedding = nn.Embedding(1, cfg.dim)
        nn.init.normal_(self.mask_embedding.weight, 0.0, cfg.dim**-0.5)

    @staticmethod
    def _window(batch: dict[str, torch.Tensor], last: torch.Tensor) -> torch.Tensor:
        """The window shifted by one: ``items[1:]`` followed by ``last`` ``(B, 1)``."""
        return torch.cat([batch["items"][:, 1:], last], dim=1)

    def forward(self, batch: dict[str, torch.Tensor], mode: str = "train") -> Any:
        """As :meth:`SequenceModel.forward`; ``train`` runs the cloze task (a fresh random
        mask on every call)."""
        if mode != "train":
            return super().forward(batch, mode)
        seq = self._window(batch, batch["target_items"][:, -1:])  # the whole window, (B, T)
        real = seq != 0
        cloze = (torch.rand_like(seq, dtype=torch.float32) < self.cfg.mask_ratio) & real
        masked = {**batch, "items": seq.masked_fill(cloze, 0), "cloze_mask": cloze}
        out = self.encode(masked)
        h, maps = out["h"], batch.get("item_maps")
        out["logits"] = (h * self.items(seq, maps)).sum(-1)
        if "negatives" in batch and self.cfg.next_loss == "bce":
            neg = self.items(batch["negatives"], maps)  # (B, T, n, dim)
            out["neg_logits"] = (h.unsqueeze(2) * neg).sum(-1)
        out["loss_mask"], out["loss_targets"] = cloze, seq
        return out

    def _serving(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, dim)``: the output at the ``[mask]`` appended after the history."""
        items = batch["items"]
        seq = self._window(batch, items.new_zeros(items.shape[0], 1))
        cloze = (torch.arange(seq.shape[1], device=seq.device) == seq.shape[1] - 1).expand_as(seq)
        return self.encode({**batch, "items": seq, "cloze_mask": cloze})["h"][:, -1]

    def score_candidates(self, batch: dict[str, torch.Tensor], candidates: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` scores of candidates as the item at the appended ``[mask]``."""
        h = self._serving(batch)
        return (h.unsqueeze(1) * self.items(candidates)).sum(-1)

    def score_all(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, n_items + 1)`` scores of every item at the appended ``[mask]``."""
        h = self._serving(batch)
        return h @ self.items(torch.arange(self.data.n_items + 1, device=h.device)).T
