"""DimeRec — multi-interest guidance and diffusion aggregation on the sphere.

Wuchao Li, Rui Huang, Haijun Zhao, Chi Liu, Kai Zheng, Qi Liu, Na Mou, Guorui Zhou,
Defu Lian, Yang Song, Wentian Bao, Enyun Yu, Wenwu Ou. "DimeRec: A Unified Framework for
Enhanced Sequential Recommendation via Generative Diffusion Models", WSDM 2025
(arXiv:2408.12153). ``../shared/reference/seed_baselines.md`` section 6.

* **GEM, guidance extraction** (ComiRec-SA, Cao et al. KDD 2020): ``H`` = item embeddings
  plus positions; ``A = softmax_positions(W2 tanh(W1 H))`` ``(N, K)``; the K guidance
  vectors are ``g = A^T H``, computed for every prefix (the softmax runs over positions up
  to t). ``L_gem``: the softmax loss of the interest closest to the target
  (:mod:`fedrec.models.retrieval`).
* **DAM, diffusion aggregation**: item vectors live on the unit sphere. The clean sample
  ``x_0`` is the target item's vector; the forward process is a **geodesic random walk**:
  tangent Gaussian noise at ``x_0`` mapped back onto the sphere by the exponential map, at
  an angle ``sigma_t = sigma-max * t / steps`` (norms stay 1, which is the point of GRW:
  a shrinking L2 reconstruction and a growing inner product no longer fight over the norm).
  ``sigma-max`` is pi/2 by default: at ``t = steps`` the noisy point is orthogonal to
  ``x_0`` and carries nothing of it, so serving from noise matches training.
  An MLP denoiser ``x^_0 = f(x_t, t, g)`` (inputs: ``x_t``, a timestep embedding, the
  guidance pooled by attention from ``x_t``) predicts ``x_0`` directly, normalised.
* **Loss** ``L = L_gem + lambda * L_recon + mu * L_ssm`` with ``L_recon = ||x_0 - x^_0||^2``
  and ``L_ssm`` the softmax loss of ``x^_0`` as the user vector (``recon-weight``,
  ``ssm-weight``). All scores are cosines over ``temperature`` (0.1).
* **Serving**: ``sample-steps`` reverse steps (DDIM-like, deterministic): start at angle
  ``sigma_max`` from the normalised mean guidance along a *fixed* noise direction (drawn
  once from seed 0, so a user's recommendations do not change from call to call), then at
  each step predict ``x^_0`` and move back along the geodesic from ``x^_0`` towards
  ``x_t`` to the next, smaller noise angle; items are scored against the final ``x^_0``.
  The default is one step (``x^_0 = f(x_T, T, g)``): on LastFM 5 reverse steps give test
  HR@10 0.3376 against 0.5138 for one (``simulations/results/lastfm_seed_models.json``,
  seed 0).
  The cost grows linearly with ``sample-steps`` (measured per user in
  ``simulations/bench_long_sequences.py``). ``diffusion = false`` serves with the guidance
  module alone (max over interests): the paper's "GEM only" comparison.

DimeRec has no Transformer: the shared options ``layers`` and ``heads`` are accepted (the
per-dataset defaults set them for every sequence model) but change nothing.

Choices where the paper (read through its abstract and second-hand notes) is silent: the
linear angle schedule, the attention pooling of the guidance, a 2-layer MLP denoiser, and
the uniform timestep sampling in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedrec.errors import ConfigError
from fedrec.models.base import ModelData
from fedrec.models.retrieval import RetrievalConfig, RetrievalModel, softmax_loss

__all__ = ["DimeRecConfig", "DimeRec", "sphere_step", "slerp_towards"]


@dataclass
class DimeRecConfig(RetrievalConfig):
    """DimeRec's options (module docstring); ``interests`` is GEM's K."""

    interests: int = 4
    temperature: float = 0.1
    steps: int = 20
    #: reverse steps at serving; 1 = one denoising from pure noise (see the module docstring)
    sample_steps: int = 1
    #: the noise angle at t = steps; pi/2: x_T carries nothing of x_0
    sigma_max: float = math.pi / 2
    recon_weight: float = 1.0
    ssm_weight: float = 1.0
    diffusion: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"model option 'steps' must be a positive integer (got {self.steps!r})")
        if not isinstance(self.sample_steps, int) or not 1 <= self.sample_steps <= self.steps:
            raise ConfigError(f"model option 'sample-steps' must be in [1, steps = {self.steps}] (got {self.sample_steps!r})")
        if not 0.0 < self.sigma_max <= math.pi / 2 + 1e-9:
            raise ConfigError(f"model option 'sigma-max' must be in (0, pi/2] radians (got {self.sigma_max})")
        for name in ("recon_weight", "ssm_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"model option '{name.replace('_', '-')}' must be non-negative (got {getattr(self, name)})")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-8)


def sphere_step(x: torch.Tensor, direction: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """The exponential map on the unit sphere: from unit ``x`` along the tangent part of
    ``direction`` by ``angle`` radians (``angle`` broadcast over the last dimension)."""
    tangent = direction - (direction * x).sum(-1, keepdim=True) * x
    tangent = _unit(tangent)
    angle = angle.unsqueeze(-1)
    return _unit(torch.cos(angle) * x + torch.sin(angle) * tangent)


def slerp_towards(a: torch.Tensor, b: torch.Tensor, fraction: float | torch.Tensor) -> torch.Tensor:
    """The point ``fraction`` of the way along the geodesic from unit ``a`` to unit ``b``."""
    cos = (a * b).sum(-1, keepdim=True)
    tangent = b - cos * a
    sin = tangent.norm(dim=-1, keepdim=True)
    omega = torch.atan2(sin, cos)
    return _unit(torch.cos(fraction * omega) * a + torch.sin(fraction * omega) * _unit(tangent))


class DimeRec(RetrievalModel):
    """DimeRec (module docstring)."""

    def __init__(self, data: ModelData, cfg: DimeRecConfig) -> None:
        super().__init__(data, cfg)
        d, K = cfg.dim, cfg.interests
        self.positions = nn.Embedding(cfg.max_len, d)
        self.gem_hidden = nn.Linear(d, 4 * d)
        self.gem_scores = nn.Linear(4 * d, K)
        self.time_embedding = nn.Embedding(cfg.steps + 1, d)
        self.denoiser = nn.Sequential(nn.Linear(3 * d, 2 * d), nn.GELU(), nn.Linear(2 * d, 2 * d), nn.GELU(),
                                      nn.Linear(2 * d, d))
        self.drop = nn.Dropout(cfg.dropout)
        # the fixed serving noise (not a parameter or buffer: Opacus forbids buffers)
        self._start_noise = torch.randn(d, generator=torch.Generator().manual_seed(0))

    def item_vectors(self, items: torch.Tensor, maps: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Item vectors on the unit sphere."""
        return _unit(self.items(items, maps))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The noise angle of timestep ``t`` (radians)."""
        return self.cfg.sigma_max * t.to(torch.get_default_dtype()) / self.cfg.steps

    def guidance(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """GEM: ``(B, T, K, d)`` unit guidance vectors of every prefix."""
        items = batch["items"]
        B, T = items.shape
        pad = items == 0
        pos = torch.arange(self.cfg.max_len - T, self.cfg.max_len, device=items.device)
        # item embeddings scaled by sqrt(d) as in SASRec: they start at norm ~1, the
        # positions at ~sqrt(d), which would otherwise drown the items
        H = self.items(items, batch.get("item_maps")) * math.sqrt(self.cfg.dim)
        H = self.drop(H + self.positions(pos).unsqueeze(0))  # (B, T, d)
        s = self.gem_scores(torch.tanh(self.gem_hidden(H)))  # (B, T, K)
        # prefix t attends over positions j <= t that are not padding
        allowed = torch.ones(T, T, dtype=torch.bool, device=items.device).tril()[None] & ~pad[:, None, :]
        allowed = allowed | torch.eye(T, dtype=torch.bool, device=items.device)  # (B, T, T)
        logits = s.transpose(1, 2).unsqueeze(2).expand(B, -1, T, T)  # (B, K, T_query, T_key)
        w = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
        g = torch.einsum("bkqj,bjd->bqkd", w, H)
        return _unit(g)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``x^_0 = f(x_t, t, g)``: ``x_t`` ``(..., d)``, ``t`` ``(...)`` timesteps, ``g``
        ``(..., K, d)`` guidance -> unit ``(..., d)``."""
        w = torch.softmax((g * x_t.unsqueeze(-2)).sum(-1) / self.cfg.temperature, dim=-1)  # (..., K)
        pooled = (w.unsqueeze(-1) * g).sum(-2)
        return _unit(self.denoiser(torch.cat([x_t, self.time_embedding(t), pooled], dim=-1)))

    def user_vectors(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """The K guidance vectors of every prefix (GEM)."""
        return self.guidance(batch), None, {}

    def auxiliary_loss(self, batch: dict[str, torch.Tensor], out: dict[str, Any]) -> torch.Tensor:
        """``lambda * L_recon + mu * L_ssm`` of one forward diffusion draw per position."""
        cfg = self.cfg
        if not cfg.diffusion or (cfg.recon_weight == 0 and cfg.ssm_weight == 0):
            return out["query"].new_zeros(())
        maps = batch.get("item_maps")
        targets = batch["target_items"]
        weight = out["weight"].to(out["query"].dtype)
        count = weight.sum().clamp(min=1.0)
        x0 = self.item_vectors(targets, maps)  # (B, T, d)
        # t uniform in 1..steps; rand_like (not randint) so that it runs under vmap
        t = (torch.rand_like(weight) * cfg.steps).long().clamp(max=cfg.steps - 1) + 1
        noise = torch.randn_like(x0)
        x_t = sphere_step(x0, noise, self.sigma(t))
        x_hat = self.denoise(x_t, t, out["reps"])
        recon = ((x0 - x_hat) ** 2).sum(-1)
        loss = cfg.recon_weight * (recon * weight).sum() / count
        if cfg.ssm_weight:
            loss = loss + cfg.ssm_weight * softmax_loss(
                x_hat, targets, weight, self.item_vectors, softmax=cfg.softmax, n_items=self.data.n_items,
                temperature=cfg.temperature, logq=cfg.logq, label_smoothing=cfg.label_smoothing, pool=cfg.pool,
                negatives=batch.get("negatives"), vmap_safe=self.vmap_safe, maps=maps)
        return loss

    def sample(self, g: torch.Tensor) -> torch.Tensor:
        """Deterministic reverse diffusion from guidance ``g`` ``(B, K, d)`` -> ``(B, d)``
        (module docstring)."""
        cfg = self.cfg
        B = g.shape[0]
        start = _unit(g.mean(-2))
        noise = self._start_noise.to(g.device, g.dtype).expand_as(start)
        timesteps = torch.linspace(cfg.steps, 1, cfg.sample_steps).round().long().tolist()
        x = sphere_step(start, noise, self.sigma(torch.full((B,), cfg.steps, device=g.device)))
        for i, t in enumerate(timesteps):
            x_hat = self.denoise(x, torch.full((B,), t, dtype=torch.long, device=g.device), g)
            if i + 1 < len(timesteps):
                nxt = timesteps[i + 1]
                x = slerp_towards(x_hat, x, nxt / t)
        return x_hat  # sample_steps >= 1: the loop ran

    def serving_vectors(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, 1, d)`` the sampled next-item vector (``(B, K, d)`` guidance with
        ``diffusion = false``)."""
        g = self.guidance(batch)[:, -1]
        if not self.cfg.diffusion:
            return g
        return self.sample(g).unsqueeze(1)
