"""SASRec — Self-Attentive Sequential Recommendation.

Wang-Cheng Kang, Julian McAuley. "Self-Attentive Sequential Recommendation", ICDM 2018.

The plain backbone of :mod:`fedrec.models.backbone`: causal self-attention blocks with a
residual position-wise FFN, the next-item head (BCE against one sampled negative per
position, as in the paper) or the CTR head of the MRFF reference. Registered as ``sasrec``;
``bert4rec-last`` is the same model with bidirectional attention (BERT4Rec's encoder, Sun et al.,
CIKM 2019), trained on each window's last position (``bert4rec`` has the cloze task,
:mod:`fedrec.models.bert4rec`).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedrec.models.backbone import BackboneConfig, ResidualFFN, SequenceModel
from fedrec.models.base import ModelData

__all__ = ["SASRecConfig", "SASRec"]


@dataclass
class SASRecConfig(BackboneConfig):
    """The backbone's options (see :class:`~fedrec.models.backbone.BackboneConfig`)."""


class SASRec(SequenceModel):
    """SASRec (or, with ``bidirectional=True``, a BERT4Rec-style encoder)."""

    def __init__(self, data: ModelData, cfg: SASRecConfig) -> None:
        super().__init__(data, cfg, make_ffn=lambda layer: ResidualFFN(cfg))
