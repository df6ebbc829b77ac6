"""QARM — quantitative codes of aligned multi-modal item embeddings as trainable ID features.

Xinchen Luo, Jiangxia Cao, et al. "QARM: Quantitative Alignment Multi-Modal Recommendation at
Kuaishou", arXiv:2411.11739 (CIKM 2025).

Frozen content embeddings are trained for other goals than user behaviour ("representation
unmatching") and get no gradient from the ranker ("representation unlearning"). QARM aligns
the content embeddings with behaviour (contrastive item pairs), quantises them into codes
(VQ: nearest anchors; RQ-KMeans: residual k-means levels), and feeds the codes to the
ranking model as ordinary ID features with their own *trainable* embeddings
(``../shared/reference/seed_baselines.md`` section 2). The content, alignment and codes are
:mod:`fedrec.models.content` (a pretrained WordLlama text encoder over MovieLens titles and
genres; attribute codes where the data has no text).

The ranking model is the CTR model of the shared backbone (SASRec's blocks over the
impression sequence, the CTR head on ``[h_t ; item ; e_u]``); QARM changes only the item
representation, in the target and in the history alike: ``item = base(item) + sum of the
code embeddings`` (``content``):

``vq+rq`` (default)
    the ``vq-top`` VQ codes (mean of their embeddings) and the ``rq-levels`` RQ codes (one
    table per level, summed);
``vq`` / ``rq``
    one kind only;
``frozen``
    the aligned embedding itself, frozen, through a trainable linear map (the paper's
    "frozen aligned embedding" row);
``none``
    no content: the backbone model alone (= ``sasrec``).

The content, the alignment and the codes are computed once, before the first training step,
from the training split (:meth:`QARM.prepare`), and saved with the model. Under the
federated engine ``prepare`` does not run (the alignment reads every user's histories, which
no client may): the codes are all padding and QARM trains as its backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.backbone import BackboneConfig, ResidualFFN, SequenceModel
from fedrec.models.base import ModelData

__all__ = ["QARMConfig", "QARM"]

_CONTENT = ("vq+rq", "vq", "rq", "frozen", "none")
_PAIRS = ("both", "item2item", "user2item")


@dataclass
class QARMConfig(BackboneConfig):
    """QARM's options (module docstring) on top of the backbone's."""

    content: str = "vq+rq"
    #: align the content embeddings with behaviour pairs (false: codes of the raw content)
    align: bool = True
    pairs: str = "both"
    align_dim: int = 64
    align_epochs: int = 5
    #: VQ: anchor items and nearest anchors per item (the paper: 25 of a large pool)
    vq_anchors: int = 256
    vq_top: int = 5
    #: RQ-KMeans: levels and centroids per level (the paper: 6 levels)
    rq_levels: int = 3
    rq_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.content not in _CONTENT:
            raise ConfigError(f"model option 'content' must be one of {', '.join(_CONTENT)} (got {self.content!r})")
        if self.pairs not in _PAIRS:
            raise ConfigError(f"model option 'pairs' must be one of {', '.join(_PAIRS)} (got {self.pairs!r})")
        for name in ("align_dim", "align_epochs", "vq_anchors", "vq_top", "rq_levels", "rq_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model option '{name.replace('_', '-')}' must be a positive integer (got {value!r})")
        if self.vq_top > self.vq_anchors:
            raise ConfigError(f"model option 'vq-top' ({self.vq_top}) must be <= 'vq-anchors' ({self.vq_anchors})")


class _CodedItems(nn.Module):
    """The base item representation plus the embeddings of the item's codes."""

    def __init__(self, base: nn.Module, data: ModelData, cfg: QARMConfig) -> None:
        super().__init__()
        self.base, self.mode, d = base, cfg.content, cfg.dim
        n = data.n_items + 1
        self.vq = self.rq = self.frozen = None
        # codes and the frozen embedding are data (set by QARM.prepare), not parameters
        self.vq_codes = torch.zeros(n, cfg.vq_top, dtype=torch.long)
        self.rq_codes = torch.zeros(n, cfg.rq_levels, dtype=torch.long)
        self.aligned = torch.zeros(n, cfg.align_dim)
        if "vq" in self.mode:
            self.vq = nn.Embedding(cfg.vq_anchors + 1, d, padding_idx=0)
            nn.init.normal_(self.vq.weight, 0.0, d**-0.5)
        if "rq" in self.mode:
            self.rq = nn.ModuleList(nn.Embedding(cfg.rq_size + 1, d, padding_idx=0) for _ in range(cfg.rq_levels))
            for table in self.rq:
                nn.init.normal_(table.weight, 0.0, d**-0.5)
        if self.mode == "frozen":
            self.frozen = nn.Linear(cfg.align_dim, d)
        with torch.no_grad():
            for table in ([self.vq] if self.vq is not None else []) + list(self.rq or []):
                table.weight[0].zero_()

    def forward(self, items: torch.Tensor, maps: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``(...,)`` item indices -> ``(..., dim)``."""
        x = self.base(items, maps)
        if maps is not None:  # compact tables are not used for QARM (item_tables() is None)
            raise ValueError("QARM has no compact item tables")
        if self.vq is not None:
            codes = self.vq_codes.to(items.device)[items]  # (..., K)
            x = x + self.vq(codes).mean(-2)
        if self.rq is not None:
            codes = self.rq_codes.to(items.device)[items]
            for level, table in enumerate(self.rq):
                x = x + table(codes[..., level].contiguous())
        if self.frozen is not None:
            x = x + self.frozen(self.aligned.to(items.device)[items])
        return x


class QARM(SequenceModel):
    """QARM (module docstring)."""

    tasks = ("ctr", "next_item")

    def __init__(self, data: ModelData, cfg: QARMConfig) -> None:
        super().__init__(data, cfg, make_ffn=lambda layer: ResidualFFN(cfg))
        self.items = _CodedItems(self.items, data, cfg)
        #: what prepare() found (content source, pairs, codes used)
        self.content_info: dict[str, Any] = {}
        self._loaded = False  # codes came with loaded weights: prepare() keeps them

    @property
    def fits_on_log(self) -> bool:
        """Whether :meth:`prepare` reads the training log (behaviour pairs): a stream refuses it."""
        return self.cfg.content != "none"

    def prepare(self, split) -> None:
        """Content vectors, behaviour alignment and codes from the training split (once,
        before the first step; the trainer calls it). A model whose codes were loaded with
        its weights keeps them (they depend on the seed of the run that made them)."""
        from fedrec.models import content as C

        cfg = self.cfg
        if self._loaded:
            return
        if cfg.content == "none":
            self.content_info = {"content": "none"}
            return
        seed = int(torch.initial_seed() % (2**31))
        vectors, source = C.content_vectors(split, dim=cfg.align_dim, seed=seed)
        info: dict[str, Any] = {"content": cfg.content, "source": source, "content_dim": int(vectors.shape[1])}
        if cfg.align:
            pairs = C.behaviour_pairs(split, vectors, kind=cfg.pairs)
            emb = C.align(vectors, pairs, dim=cfg.align_dim, epochs=cfg.align_epochs, seed=seed)
            info["pairs"] = int(len(pairs))
        else:
            emb = vectors if vectors.shape[1] == cfg.align_dim else _project(vectors, cfg.align_dim, seed)
        items = self.items
        if items.vq is not None:
            items.vq_codes = torch.from_numpy(C.vq_codes(emb, anchors=cfg.vq_anchors, top=cfg.vq_top, seed=seed))
            info["vq_distinct"] = int(len(np.unique(items.vq_codes[1:].numpy(), axis=0)))
        if items.rq is not None:
            items.rq_codes = torch.from_numpy(C.rq_codes(emb, levels=cfg.rq_levels, size=cfg.rq_size, seed=seed))
            info["rq_distinct"] = int(len(np.unique(items.rq_codes[1:].numpy(), axis=0)))
        items.aligned = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
        self.content_info = info

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        """The codes and the aligned embedding (saved with the weights)."""
        return {"vq_codes": self.items.vq_codes, "rq_codes": self.items.rq_codes, "aligned": self.items.aligned}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the codes and the aligned embedding."""
        self.items.vq_codes = state["vq_codes"].long()
        self.items.rq_codes = state["rq_codes"].long()
        self.items.aligned = state["aligned"].float()
        self._loaded = bool((self.items.vq_codes != 0).any() or (self.items.rq_codes != 0).any()
                            or (self.items.aligned != 0).any())

    def item_tables(self) -> None:
        """No compact per-user item tables (the code tables are shared by many items)."""
        return None


def _project(vectors: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """A fixed random projection to ``dim``, unit norm (codes of unaligned content)."""
    rng = np.random.default_rng(seed)
    out = vectors @ rng.standard_normal((vectors.shape[1], dim)).astype(np.float32)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return np.where(norm > 0, out / np.maximum(norm, 1e-12), 0.0).astype(np.float32)
