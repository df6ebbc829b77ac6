"""User-level differential privacy on the clients (DP-SGD / DP-FedAvg with Opacus accounting).

The privacy unit is **one user's training sequence**. In a round, every participating user
trains its own copy of the shared parameters (see :mod:`fedrec.federated.algorithm`); what
leaves the client is the sum of those copies. With DP on, the client:

1. turns each user's change into a *pseudo-gradient* ``(global - trained) / lr`` over
   everything the user uploads (the public parameters and the group FFNs it was routed to),
   and clips it to L2 norm ``max_grad_norm``. With ``local_steps = 1`` and ``optimizer =
   sgd`` this is exactly the user's gradient, so the mechanism is DP-SGD with per-user
   clipping; with more steps or Adam it is DP-FedAvg's per-user update clipping. Norms are
   computed on the stacked per-user tensors the engine already holds (no extra per-user
   gradient of any table is materialised; a user's unchosen groups have zero change). Item
   tables are per-user *compact* copies of the rows the user read (the engine's default),
   so memory does not grow with the catalogue; the norm is the same, since unread rows do
   not change.
2. adds Gaussian noise ``N(0, (noise_multiplier * max_grad_norm)^2)`` (times ``lr``) to
   every coordinate of every uploaded sum — public sums and all group sums, chosen or not.
3. records one step of the sampled Gaussian mechanism in an Opacus accountant whose state
   lives in the client's persisted state, so epsilon accumulates across rounds.

Private parameters (user FFNs, user tables) never leave the client and are trained without
clipping or noise. What the server still learns without noise: per shard, the number of
participating users and how many chose each group at each layer (so, for a shard of one
user, that user's groups), and the evaluation summaries. Training losses are not reported
under DP.

The accountant's sampling rate is 1: user participation (``fraction``) is drawn from the
run seed, which the server knows, so it gives no amplification by sampling. The noise is
drawn from a secret per-process seed unless ``dp_noise_seed`` is set (reproducible
experiments only: a server that knows the seed can remove the noise).

**Central DP** (client level, the alternative): clients upload their *mean* model
(:func:`client_means`), Flower's ``DifferentialPrivacyServerSideFixedClipping`` clips each
client's ``model - global`` to a norm and adds Gaussian noise to the average, which the
role-aware strategy then takes with equal client weights; :func:`central_epsilon` accounts
for it. The server is trusted to add the noise.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable

import numpy as np
import torch

from fedrec.errors import ConfigError

__all__ = ["ACCOUNTANTS", "UserLevelDP", "calibrate_noise", "central_epsilon", "client_means", "epsilon_of",
           "privacy_from_config"]

ACCOUNTANTS = ("rdp", "prv")


def _accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    return {"rdp": RDPAccountant, "prv": PRVAccountant}[name]()


def calibrate_noise(*, target_epsilon: float, delta: float, rounds: int, accountant: str = "rdp") -> float:
    """The smallest noise multiplier whose ``rounds`` releases (sampling rate 1) stay within
    ``(target_epsilon, delta)`` under Opacus's ``accountant``."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=1.0,
                                      steps=rounds, accountant=accountant))


def epsilon_of(history: torch.Tensor, *, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of an accountant ``history`` (rows ``noise_multiplier, sample_rate, steps``)."""
    if history.numel() == 0:
        return 0.0
    acc = _accountant(accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history.tolist()]
    return float(acc.get_epsilon(delta))


class UserLevelDP:
    """The clipping, noise and accounting of one run (see the module docstring).

    Parameters are keyword-only: ``max_grad_norm`` (> 0), ``noise_multiplier`` (>= 0; 0
    clips without noise, so epsilon is infinite), ``delta``, ``lr`` (the local learning
    rate, which converts updates to pseudo-gradients), ``accountant`` (``rdp`` | ``prv``),
    ``noise_seed`` (None: secret).
    """

    def __init__(self, *, max_grad_norm: float, noise_multiplier: float, delta: float, lr: float,
                 accountant: str = "rdp", noise_seed: int | None = None) -> None:
        if not max_grad_norm > 0:
            raise ConfigError(f"federated option 'max_grad_norm' must be > 0 (got {max_grad_norm})")
        if not noise_multiplier >= 0:
            raise ConfigError(f"federated option 'noise_multiplier' must be >= 0 (got {noise_multiplier})")
        if not 0 < delta < 1:
            raise ConfigError(f"federated option 'delta' must be in (0, 1) (got {delta})")
        if accountant not in ACCOUNTANTS:
            raise ConfigError(f"federated option 'accountant' must be one of {', '.join(ACCOUNTANTS)} (got {accountant!r})")
        self.max_grad_norm, self.noise_multiplier, self.delta = float(max_grad_norm), float(noise_multiplier), float(delta)
        self.lr, self.accountant = float(lr), accountant
        self.noise_seed = noise_seed
        self._secret = secrets.randbits(62)

    # -- clipping ------------------------------------------------------------------------
    def clip_(self, params: dict[str, torch.Tensor], global_params: dict[str, torch.Tensor],
              members: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """Clip each user's change in place.

        ``params``: name -> ``(C, ...)`` per-user trained copies of the uploaded tensors;
        ``global_params``: name -> what the copies started from (the global tensor, or for a
        compact item table the ``(C, K, D)`` global rows each user's copy holds: rows a
        user never read have no change, so the norm over its rows is the norm over the
        table); ``members``: name -> ``(C,)`` 0/1 whether the user uploads that tensor (a
        group it chose), or None (public: every user). Afterwards ``params[n][u] = global[n]
        + clipped change`` for members (non-members' rows are scaled too, but they are not
        uploaded). Returns the ``(C,)`` pseudo-gradient norms before clipping.
        """
        sq = None
        for n, p in params.items():
            # turn the copy into its change in place (no temporary of a large table), norms in
            # the parameters' dtype (no float64 copy)
            p.sub_(global_params[n])
            d = torch.linalg.vector_norm(p.flatten(1), dim=1).to(torch.float64).pow(2)
            m = members.get(n)
            d = d if m is None else d * m.to(torch.float64)
            sq = d if sq is None else sq + d
        if sq is None:
            return torch.zeros(0, dtype=torch.float64)
        norms = sq.sqrt() / self.lr
        factor = (self.max_grad_norm / (norms + 1e-12)).clamp(max=1.0)
        for n, p in params.items():
            f = factor.to(p.dtype).view(-1, *([1] * (p.dim() - 1)))
            p.mul_(f).add_(global_params[n])
        return norms

    # -- noise ---------------------------------------------------------------------------
    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to each uploaded coordinate (in parameter
        units: ``lr * noise_multiplier * max_grad_norm``)."""
        return self.lr * self.noise_multiplier * self.max_grad_norm

    def generator(self, *, seed: int, round: int, shard_key: int) -> torch.Generator:
        """The noise generator of one client and round (secret unless ``noise_seed`` is set)."""
        base = self._secret if self.noise_seed is None else self.noise_seed
        g = torch.Generator()
        g.manual_seed(int(np.random.default_rng([base, seed, round, shard_key, 17]).integers(2**62)))
        return g

    def add_noise(self, sums: dict[str, torch.Tensor], names: Iterable[str], generator: torch.Generator) -> None:
        """Add the Gaussian noise to ``sums[name]`` in place, for every name in ``names``."""
        if self.noise_multiplier == 0:
            return
        for n in names:
            # drawn in the sums' own dtype, added in place: no float64 temporary of a large table
            # (a change of 2026-11: with a fixed dp_noise_seed, float32 runs get other draws
            # than before, when the noise was drawn in float64 and rounded)
            sums[n].add_(torch.randn(sums[n].shape, generator=generator, dtype=sums[n].dtype), alpha=self.noise_std)

    # -- accounting ----------------------------------------------------------------------
    def step(self, history: torch.Tensor) -> torch.Tensor:
        """The accountant history after one more release (rows ``sigma, q, steps``, merged
        like Opacus's accountants do)."""
        row = torch.tensor([[self.noise_multiplier, 1.0, 1.0]], dtype=torch.float64)
        if history.numel() and history[-1, 0] == self.noise_multiplier and history[-1, 1] == 1.0:
            history = history.clone()
            history[-1, 2] += 1
            return history
        return torch.cat([history.reshape(-1, 3).to(torch.float64), row])

    def epsilon(self, history: torch.Tensor) -> float:
        """Epsilon spent by ``history`` at this run's delta (inf when there is no noise)."""
        if history.numel() and self.noise_multiplier == 0:
            return math.inf
        return epsilon_of(history, delta=self.delta, accountant=self.accountant)


def privacy_from_config(cfg, *, releases_per_round: int = 1) -> UserLevelDP | None:
    """The :class:`UserLevelDP` of a federated config (None when DP is off): ``delta``
    defaults to 1 / ``population``; with ``target_epsilon`` the noise is calibrated, the same
    on every client, for ``rounds * releases_per_round`` releases."""
    if not cfg.dp:
        return None
    if not cfg.delta and not cfg.population:
        raise ConfigError("differential privacy: 'delta' defaults to 1 / 'population' (the number of users in "
                          "the whole federation, which a node cannot count): set 'population' or 'delta' "
                          "(fedrec simulate and a federation folder's manifest set the population)")
    delta = cfg.delta or 1.0 / cfg.population
    sigma = cfg.noise_multiplier
    if cfg.target_epsilon:
        sigma = calibrate_noise(target_epsilon=cfg.target_epsilon, delta=delta, rounds=cfg.rounds * releases_per_round,
                                accountant=cfg.accountant)
    return UserLevelDP(max_grad_norm=cfg.max_grad_norm, noise_multiplier=sigma, delta=delta, lr=cfg.lr,
                       accountant=cfg.accountant, noise_seed=cfg.dp_noise_seed if cfg.dp_noise_seed >= 0 else None)


# -- central (client-level) DP -------------------------------------------------------------
def client_means(layout, global_params: dict[str, torch.Tensor], upload) -> dict[str, torch.Tensor]:
    """A client's upload as a *model* (for Flower's central-DP wrappers, which clip each
    client's ``model - global``): public = its weighted mean, each group = the mean over its
    members, or the global value when none of its users chose it (a zero update)."""
    out = {}
    for n in layout.global_names:
        if n in layout.groups:
            layer, g = layout.groups[n]
            c = float(upload.group_counts[layer, g])
            out[n] = (upload.sums[n].double() / c).to(global_params[n].dtype) if c > 0 else global_params[n].clone()
        else:
            out[n] = ((upload.sums[n].double() / upload.weight).to(global_params[n].dtype) if upload.weight > 0
                      else global_params[n].clone())
    return out


def central_epsilon(*, noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` releases of the central Gaussian mechanism with every client
    taking part (sampling rate 1), from Opacus's RDP analysis; inf without noise."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    return epsilon_of(torch.tensor([[noise_multiplier, 1.0, float(rounds)]], dtype=torch.float64), delta=delta)
