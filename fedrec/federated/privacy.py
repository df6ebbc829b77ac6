"""User-level differential privacy on the clients (DP-SGD / DP-FedAvg with Opacus accounting).

The privacy unit is **one user**: its whole training sequence, in every round. In a round,
every participating user trains its own copy of the shared parameters (see
:mod:`fedrec.federated.algorithm`); what leaves the client is the sum of those copies. With
DP on, the client:

1. turns each user's change into a *pseudo-gradient* ``(global - trained) / lr`` over
   everything the user uploads (the public parameters and the group FFNs it was routed to),
   and clips it to L2 norm ``max_grad_norm`` (C), jointly over all those tensors. With
   ``local_steps = 1`` and ``optimizer = sgd`` this is exactly the user's gradient, so the
   mechanism is DP-SGD with per-user clipping; with more steps or Adam it is DP-FedAvg's
   per-user update clipping. Norms are computed on the stacked per-user tensors the engine
   already holds (no extra per-user gradient of any table is materialised; a user's unchosen
   groups have zero change). Item tables are per-user *compact* copies of the rows the user
   read (the engine's default), so memory does not grow with the catalogue; the norm is the
   same, since unread rows do not change.
2. adds Gaussian noise ``N(0, (lr * noise_multiplier * max_grad_norm)^2)`` to every
   coordinate of every uploaded sum — public sums and all group sums, chosen or not.
3. records one release of the Gaussian mechanism (sampling rate 1, one step per round) in an
   Opacus accountant whose state lives in the client's persisted state, so epsilon
   accumulates across rounds.

**The neighbouring relation (local, user level), exactly.** Two federations are neighbours
when they differ in one user's *contribution*: in one, user ``u`` trains on its sequence;
in the other, ``u``'s clipped change is zero (the "zero-out" form of add/remove). Which users
take part in a round and how each is routed are the same in both (participation is a hash of
the run seed, the round and the raw user id, which the server knows; routing is released in
the clear, below). One user's clipped change has L2 norm at most ``lr * C`` in parameter
units, over everything it uploads, so a round's uploaded sums have that sensitivity and the
noise ``lr * noise_multiplier * C`` is the Gaussian mechanism with noise multiplier
``noise_multiplier``, which is what Opacus's accountants (RDP, PRV: add/remove adjacency)
compose, ``rounds`` times at sampling rate 1. The run's ``(epsilon, delta)`` is that
guarantee. Under **replace-one** (``u``'s sequence replaced by any other, routed alike) the
sensitivity doubles to ``2 lr C``: the guarantee is the accountant's at noise multiplier
``noise_multiplier / 2`` (:func:`replace_one_epsilon`; the result's ``privacy`` block reports
it as ``epsilon-replace-one``). Adding or removing a user *from the federation* is not
covered: a client's number of participating users is sent in the clear (a phone's existence
is known to the server it talks to).

**What leaves a client under DP, and why** (train reply): the noised sums (covered above);
``users`` and ``weight`` (the number of participating users, a function of the shard's
membership and the public seed, not of data: ``weighting = users`` is required); per layer
the users per group, ``group-counts``, and how many changed group, ``group-changed`` with
``routed-before``: **not protected** (they reveal, for a one-user client, which group that
user was routed to, MRFF's designed leak); ``epsilon``, ``noise-multiplier``, ``delta``
(functions of the options and the round); ``shard`` (the client id). **Not sent under DP**:
the training loss (``loss-sum``) and the number of training targets (``examples``, for a
one-user client its history length); ``num-examples`` (Flower's weighting key) is the
number of users. The node's ``info`` reply leaves out its interaction counts (``rows``,
``out-of-catalogue``) and its data fingerprint (``data-fingerprint``, a hash that would confirm
a guessed history). The evaluate reply (valid/test summaries: score histograms, metric
sums, coverage counts) is computed on the held-out interactions and is **outside** the
training guarantee. Private parameters (user FFNs, user tables) never leave the client and
are trained without clipping or noise.

The accountant's sampling rate is 1: user participation (``fraction``) is drawn from the
run seed, which the server knows, so it gives no amplification by sampling. The noise is
drawn from a secret per-process seed unless ``dp_noise_seed`` is set (reproducible
experiments only: a server that knows the seed can remove the noise).

**delta.** The default is ``DELTA_SCALE / population`` (0.01 / N): the mechanism that
publishes each of N users' data with probability delta is (0, delta)-DP, so delta = 1 / N
(the default before issue 19) allows one user's data in the clear on average; at 0.01 / N
the chance that anyone's is, is at most 1%. Opacus's and TF Privacy's guidance is "orders of
magnitude below 1 / N". An explicit ``delta`` above 1 / population is accepted with a
warning (:func:`check_delta`).

**Central DP** (client level, the alternative): clients upload their *mean* model
(:func:`client_means`), Flower's ``DifferentialPrivacyServerSideFixedClipping`` clips each
client's ``model - global`` to the clipping norm C (jointly over all arrays) and adds Gaussian
noise ``noise_multiplier * C / n`` to the average over a fixed ``n`` (the run's number of
clients: a client that does not reply counts as a zero update, so the noise never falls
below ``noise_multiplier * C`` on the sum), which the role-aware strategy takes with equal
client weights; :func:`central_epsilon` accounts for it, every client every round (sampling
rate 1, ``rounds`` steps). The relation is **add/remove one client** (its whole shard, as a
zero update; sensitivity C of the sum); replace-one client doubles it (noise multiplier / 2).
The server is trusted: it sees every client's unnoised mean model and metrics; the
guarantee covers what it *releases*, the global models of every round. Released besides, in
the clear: the round's total users and per-group counts (sent back to every client as the
balance-loss share, and in the history), and the evaluation metrics. The clients send no
training loss and no example counts under central DP either. ``central-delta`` defaults to
``min(1e-5, DELTA_SCALE / clients)`` and warns above 1 / clients.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable

import numpy as np
import torch

from fedrec.errors import ConfigError

__all__ = ["ACCOUNTANTS", "DELTA_SCALE", "UserLevelDP", "calibrate_noise", "central_delta", "central_epsilon",
           "check_delta", "client_means", "default_delta", "epsilon_of", "privacy_from_config", "replace_one_epsilon"]

ACCOUNTANTS = ("rdp", "prv")

#: the default delta is this fraction of 1 / (number of privacy units): 0.01 / N
DELTA_SCALE = 0.01

#: the neighbouring relations of the two mechanisms (recorded in a DP run's result)
NEIGHBOURING = {
    "local": "zero-out one user's contribution (add/remove of its clipped change; participation and routing public)",
    "central": "add/remove one client (its whole shard, as a zero update; the number of clients fixed)",
}


def default_delta(units: int) -> float:
    """The default delta for ``units`` privacy units (users, or clients under central DP):
    ``DELTA_SCALE / units`` (see the module docstring)."""
    if units < 1:
        raise ConfigError(f"differential privacy: the default delta needs the number of users (got {units})")
    return DELTA_SCALE / units


def central_delta(clients: int) -> float:
    """The default ``central-delta`` for ``clients`` clients: ``min(1e-5, DELTA_SCALE / clients)``."""
    return min(1e-5, default_delta(clients))


def check_delta(delta: float, units: int, *, key: str, unit: str = "users") -> None:
    """Warn (:class:`~fedrec.errors.FedrecWarning`, one line) when ``delta`` is above 1 /
    ``units``: such a delta allows one unit's data in the clear (see the module docstring).
    ``key`` names the option, ``unit`` what is counted. Nothing when ``units`` is unknown (0)."""
    import warnings

    from fedrec.errors import FedrecWarning

    if units > 0 and delta > 1.0 / units:
        warnings.warn(f"'{key}' {delta:g} is above 1 / {units:,} {unit} ({1.0 / units:.3g}): it allows one of them "
                      f"to be exposed in full; use at most {DELTA_SCALE / units:.3g} (the default)", FedrecWarning,
                      stacklevel=2)


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
    defaults to ``DELTA_SCALE / population`` (a given one above 1 / population warns); with
    ``target_epsilon`` the noise is calibrated, the same on every client, for ``rounds *
    releases_per_round`` releases."""
    if not cfg.dp:
        return None
    if not cfg.delta and not cfg.population:
        raise ConfigError("differential privacy: 'delta' defaults to 0.01 / 'population' (the number of users in "
                          "the whole federation, which a node cannot count): set 'population' or 'delta' "
                          "(fedrec simulate and a federation folder's manifest set the population)")
    if cfg.delta:
        check_delta(cfg.delta, cfg.population, key="delta")
    delta = cfg.delta or default_delta(cfg.population)
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


def replace_one_epsilon(*, noise_multiplier: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of ``steps`` releases (sampling rate 1) under the **replace-one** relation:
    replacing one unit's data can move the clipped sum by twice the clipping norm, so it is
    the add/remove epsilon at ``noise_multiplier / 2``; inf without noise."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    return epsilon_of(torch.tensor([[noise_multiplier / 2, 1.0, float(steps)]], dtype=torch.float64), delta=delta,
                      accountant=accountant)


def central_epsilon(*, noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` releases of the central Gaussian mechanism with every client
    taking part (sampling rate 1), from Opacus's RDP analysis; inf without noise."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    return epsilon_of(torch.tensor([[noise_multiplier, 1.0, float(rounds)]], dtype=torch.float64), delta=delta)
