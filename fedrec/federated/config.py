"""Options of a federated run (flat kebab-case keys at the edge: ``[tool.flwr.app.config]``,
``fedrec simulate --config FILE``, ``--set key=value``)."""

from __future__ import annotations

from dataclasses import dataclass

from fedrec.errors import ConfigError
from fedrec.federated.evaluation import DEFAULT_BINS
from fedrec.metrics import DEFAULT_TOPK, parse_topk

__all__ = ["FederatedConfig", "ITEM_AGGREGATIONS", "PROTOCOLS"]

PROTOCOLS = ("full", "sampled-99", "sampled-999")
#: how the public item tables are averaged (see ``item_aggregation``)
ITEM_AGGREGATIONS = ("all", "touched", "auto")


@dataclass
class FederatedConfig:
    """How clients train and how the server aggregates.

    ``rounds``
        Communication rounds.
    ``local_steps``
        Gradient steps per participating user per round; each step is one pass over the
        user's training sequence (the MRFF reference: 1).
    ``optimizer`` / ``lr``
        ``adam``: a fresh Adam per user and round (the reference: lr 0.1, so each step is
        close to a sign-gradient step of size ``lr``); ``sgd``: plain gradient steps.
    ``weighting``
        Public parameters averaged with one weight per ``users`` (the reference) or per
        training ``examples`` (target positions).
    ``item_aggregation``
        How the server averages the public item tables a user trains as a compact copy
        (the rows its history, targets and negatives read): ``all`` (every round's user
        counts for every row, a row it did not read with the global value: Chai et al.'s
        summed item gradient scaled by one over the round's users, so a row read by k of N
        users moves by about k / N of their mean change) or ``touched`` (each row averaged
        over the users that read it; rows nobody read keep their value: FedAvg row by row).
        ``touched`` sends the server which rows each client read (as its compact upload
        already does without secure aggregation) and is refused with differential privacy,
        secure aggregation, central DP and robust aggregation, whose guarantees do not cover
        those counts, and for a model without compact public item tables. ``auto`` (the
        per-dataset default of the next-item formats, ``kuaisar:`` and ``movielens:``) is
        ``touched`` where it is allowed and ``all`` elsewhere: with DP here, with secure
        aggregation, central DP or robust aggregation in the run
        spec (:class:`~fedrec.federated.spec.RunSpec` resolves it to ``all``), and for a
        model without such tables (the algorithm's ``item_aggregation``); the rounds' history
        reports ``item-rows-read`` where rows were averaged over their readers.
    ``fraction``
        Share of users taking part in each round (drawn per round from ``seed``; every
        client computes the same draw, so it is identical in any runtime).
    ``chunk_size``
        Users trained together in one vectorised pass (a memory/speed trade-off: without
        dropout the result does not depend on it; with dropout the masks are drawn per
        chunk).
    ``eval_every`` / ``patience``
        Evaluate on the validation users every ``eval_every`` rounds (and at the last);
        stop after ``patience`` evaluations without improvement (0: never stop early).
    ``protocol`` / ``eval_seed`` / ``negatives``
        Next-item evaluation protocol and its candidate seed; sampled negatives per target
        position for next-item BCE training.
    ``auc_bins``
        Resolution of the score histograms behind the pooled AUC (see
        :mod:`fedrec.federated.evaluation`).
    ``topk``
        The K list of the ranking metrics (``hr@K``, ``ndcg@K``, ``recall@K``,
        ``precision@K``, ``map@K``; ``coverage@K`` under full ranking): a list of positive
        integers or a comma-separated string (``"5,10,20"``, the only form a Flower run
        config carries); as ``fedrec train``'s option of the same name.
    ``max_grad_norm`` / ``noise_multiplier`` / ``target_epsilon`` / ``delta`` / ``accountant`` / ``dp_noise_seed``
        User-level differential privacy on the clients (:mod:`fedrec.federated.privacy`),
        on when ``noise_multiplier`` or ``target_epsilon`` is > 0 (give one of them; with
        ``target_epsilon`` the noise is calibrated so that all ``rounds`` stay within it):
        each user's pseudo-gradient is clipped to ``max_grad_norm`` (default 1.0) and
        Gaussian noise ``noise_multiplier * max_grad_norm`` is added to the client's sums. ``delta`` defaults to
        0.01 / ``population`` (one given above 1 / ``population`` is accepted with a warning);
        ``accountant`` is Opacus's ``rdp`` (default) or ``prv``;
        ``dp_noise_seed`` >= 0 makes the noise reproducible (experiments only), -1 keeps it
        secret.
    ``batch_size`` / ``weight_decay``
        Silo algorithms (``unicdr``: one client per domain, holding many users): each client
        trains ``local_steps`` epochs over its whole training data per round, in minibatches
        of ``batch_size``, with a fresh Adam (``lr``, L2 ``weight_decay``); the
        one-client-per-user engine ignores them.
    ``device``
        Where each client computes (``auto``: a GPU when the node has one; ``cpu``,
        ``cuda``, ``cuda:N``, ``mps``): see :mod:`fedrec.device`. Uploads, the server's
        aggregation and the saved states stay on the CPU, so nodes with and without a GPU
        take part in the same run.
    ``log_dir``
        Where the server writes the experiment log of the rounds (:mod:`fedrec.logs`;
        "" = none).
    ``population``
        The number of users in the whole federation (0: unknown). No node can count it from
        its own data: ``fedrec simulate`` sets it, a federation folder's manifest carries it,
        and a deployment passes it in the run config. It sets the DP ``delta`` default (0.01 /
        population) and the scale of secure aggregation's vectors.
    """

    rounds: int = 100
    local_steps: int = 1
    optimizer: str = "adam"
    lr: float = 0.1
    weighting: str = "users"
    item_aggregation: str = "all"
    fraction: float = 1.0
    chunk_size: int = 256
    seed: int = 0
    eval_every: int = 1
    patience: int = 0
    protocol: str = "full"
    eval_seed: int = 2024
    negatives: int = 1
    auc_bins: int = DEFAULT_BINS
    max_grad_norm: float = 1.0
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 0.0
    accountant: str = "rdp"
    dp_noise_seed: int = -1
    population: int = 0
    batch_size: int = 1024
    weight_decay: float = 0.0
    device: str = "auto"
    log_dir: str = ""
    topk: tuple[int, ...] = DEFAULT_TOPK

    @property
    def dp(self) -> bool:
        """Whether user-level differential privacy is on."""
        return self.noise_multiplier > 0 or self.target_epsilon > 0

    def __post_init__(self) -> None:
        for name in ("rounds", "local_steps", "chunk_size", "eval_every", "negatives", "auc_bins", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"federated option '{name}' must be >= 1 (got {getattr(self, name)})")
        if self.population < 0:
            raise ConfigError(f"federated option 'population' must be >= 0 (got {self.population})")
        for name in ("seed", "eval_seed"):  # numpy's generators take non-negative seeds only
            if getattr(self, name) < 0:
                raise ConfigError(f"federated option '{name.replace('_', '-')}' must be >= 0 (got {getattr(self, name)})")
        if self.dp_noise_seed < -1:
            raise ConfigError(f"federated option 'dp-noise-seed' must be >= 0, or -1 to keep the noise secret "
                              f"(got {self.dp_noise_seed})")
        if self.patience < 0:
            raise ConfigError(f"federated option 'patience' must be >= 0 (got {self.patience})")
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"federated option 'optimizer' must be adam or sgd (got {self.optimizer!r})")
        if self.weighting not in ("users", "examples"):
            raise ConfigError(f"federated option 'weighting' must be users or examples (got {self.weighting!r})")
        if self.item_aggregation not in ITEM_AGGREGATIONS:
            raise ConfigError(f"federated option 'item-aggregation' must be one of {', '.join(ITEM_AGGREGATIONS)} "
                              f"(got {self.item_aggregation!r})")
        if self.dp and self.item_aggregation == "touched":
            raise ConfigError("federated option 'item-aggregation' touched sends which item rows each client read, "
                              "unnoised: not with differential privacy (use item-aggregation=all or auto)")
        if not self.lr > 0:
            raise ConfigError(f"federated option 'lr' must be > 0 (got {self.lr})")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"federated option 'fraction' must be in (0, 1] (got {self.fraction})")
        if self.population and self.fraction * self.population < 1:
            raise ConfigError(f"federated option 'fraction' {self.fraction} selects on average "
                              f"{self.fraction * self.population:.2g} of the {self.population} users per round: "
                              "most rounds would train nobody (raise it to at least 1 / population)")
        for name in ("max_grad_norm", "noise_multiplier", "target_epsilon", "delta", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"federated option '{name}' must be >= 0 (got {getattr(self, name)})")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"federated option 'max_grad_norm' must be > 0 (got {self.max_grad_norm})")
        if not self.dp and self.delta:
            raise ConfigError("federated option 'delta' is given but differential privacy is off "
                              "(set noise_multiplier or target_epsilon)")
        if self.noise_multiplier and self.target_epsilon:
            raise ConfigError("give either federated option 'noise_multiplier' or 'target_epsilon', not both")
        if self.delta >= 1:
            raise ConfigError(f"federated option 'delta' must be < 1 (got {self.delta})")
        if self.accountant not in ("rdp", "prv"):
            raise ConfigError(f"federated option 'accountant' must be rdp or prv (got {self.accountant!r})")
        if self.dp and self.weighting != "users":
            raise ConfigError("differential privacy needs weighting 'users' (a user's weight must not depend on its data)")
        from fedrec.device import check_device_spec

        check_device_spec(self.device)  # each node resolves it on its own hardware
        try:
            self.topk = parse_topk(self.topk)
        except ValueError as exc:
            raise ConfigError(f"federated option 'topk': {exc}") from None
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"federated option 'protocol' must be one of {', '.join(PROTOCOLS)} (got {self.protocol!r})")
