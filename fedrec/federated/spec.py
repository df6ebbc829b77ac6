"""A federated run described by flat kebab-case keys — the Flower run config
(``[tool.flwr.app.config]``, ``flwr run . --run-config``), a ``fedrec simulate --config``
TOML file, or ``--set key=value`` — turned into typed objects in exactly one place.

Keys
----
``data`` (``synthetic:``), ``federation`` (a folder of ``fedrec data partition``: each node
reads only its own client file; instead of ``data``), ``task`` (``ctr``), ``algorithm`` (``mrff``), ``model`` (the
algorithm's default), ``shards`` (clients; in a Flower simulation the number of SuperNodes),
``partition`` (``iid`` | ``dirichlet`` | ``domain``: one client per domain of cross-domain data), ``partition-alpha``, ``partition-seed``, ``out``
(write the result JSON there), ``checkpoint-dir`` / ``checkpoint-every`` / ``resume``
(:mod:`fedrec.federated.checkpoint`), ``central-dp`` with ``central-noise-multiplier`` or
``central-target-epsilon``, ``central-clipping-norm`` and ``central-delta`` (client-level DP
with Flower's server-side fixed-clipping wrapper, :mod:`fedrec.federated.privacy`; 0, the
default: ``min(1e-5, 0.01 / clients)``),
``secure-aggregation`` with ``secagg-clipping-range`` (SecAgg+,
``server/secagg.py``), ``model-dir`` (save the model of the best validation round: the
global parameters on the server's machine, each client's private state on its own),
``min-nodes`` (a round goes on when at least this many nodes reply; 0: all ``shards``) and
``round-timeout`` (seconds a round waits for replies; 0: Flower's default), ``node-wait``
(seconds the server waits for ``shards`` nodes to connect before it gives up, 300 by
default; it logs once how many of them are connected; a Flower simulation with fewer
SuperNodes than ``shards`` is refused at once), ``attack`` / ``attack-fraction`` /
``attack-target`` / ``attack-scale`` (simulated malicious clients) and ``robust`` /
``robust-fraction`` / ``robust-norm`` (robust, role-aware aggregation; both in
:mod:`fedrec.federated.robust`); simulated failures
``client-failure`` (each training round exactly ``floor(client-failure * clients)`` clients,
drawn from ``seed`` and the round, reply with an error instead of training; in [0, 1)),
``stragglers`` (then that fraction of the other clients trains but replies
``straggler-delay`` seconds late, dropped when later than ``round-timeout``; in [0, 1)) and
``straggler-delay`` (see :mod:`fedrec.federated.failures`: the draw, what the history records,
``min-nodes`` under failures), every :class:`~fedrec.federated.config.FederatedConfig` key,
and model options as ``model.<option>`` (e.g. ``model.groups = 4``) or, where only declared
keys are accepted (``flwr run --run-config``), as one string ``model-options = "groups=4,dim=32"``.

A SuperNode's ``--node-config`` names its own data: ``data`` + ``catalogue`` (its own file and
the shared catalogue), or ``federation`` + ``shard`` (its client of a federation folder), or
``data`` + ``shard``/``shards`` (its part of a whole dataset); ``shard`` is also its client id
(checkpoint and model file names). In a simulation Flower sets ``partition-id`` /
``num-partitions``, used when ``shard`` / ``shards`` are absent. See
:mod:`fedrec.federated.nodedata`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from fedrec.config import build_config
from fedrec.errors import ConfigError
from fedrec.federated.config import FederatedConfig

__all__ = ["RunSpec", "parse_run_config"]

_PARTITIONS = ("iid", "dirichlet", "domain")


@dataclass
class RunSpec:
    """One federated run (see the module docstring)."""

    data: str = "synthetic:"
    federation: str = ""
    task: str = "ctr"
    algorithm: str = "mrff"
    model: str = ""
    shards: int = 0
    partition: str = "iid"
    partition_alpha: float = 0.5
    partition_seed: int = 0
    out: str = ""
    checkpoint_dir: str = ""
    checkpoint_every: int = 0
    resume: bool = False
    central_dp: bool = False
    central_noise_multiplier: float = 0.0
    central_target_epsilon: float = 0.0
    central_clipping_norm: float = 1.0
    central_delta: float = 0.0
    secure_aggregation: bool = False
    secagg_clipping_range: float = 8.0
    model_dir: str = ""
    min_nodes: int = 0
    round_timeout: float = 0.0
    attack: str = "none"
    attack_fraction: float = 0.0
    attack_target: str = ""
    attack_scale: float = 10.0
    robust: str = "none"
    robust_fraction: float = 0.2
    robust_norm: float = 0.0
    node_wait: float = 300.0
    client_failure: float = 0.0
    stragglers: float = 0.0
    straggler_delay: float = 0.0
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    model_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in ("ctr", "next_item", "cdr"):
            raise ConfigError(f"run config 'task' must be ctr, next_item or cdr (got {self.task!r})")
        if self.partition not in _PARTITIONS:
            raise ConfigError(f"run config 'partition' must be one of {', '.join(_PARTITIONS)} (got {self.partition!r})")
        if self.shards < 0:
            raise ConfigError(f"run config 'shards' must be >= 0 (got {self.shards})")
        if self.partition_seed < 0:
            raise ConfigError(f"run config 'partition-seed' must be >= 0 (got {self.partition_seed})")
        if self.min_nodes < 0:
            raise ConfigError(f"run config 'min-nodes' must be >= 0 (got {self.min_nodes})")
        if self.shards and self.min_nodes > self.shards:
            raise ConfigError(f"run config 'min-nodes' ({self.min_nodes}) cannot exceed 'shards' ({self.shards})")
        if not self.round_timeout >= 0:
            raise ConfigError(f"run config 'round-timeout' must be >= 0 seconds (got {self.round_timeout})")
        if not self.node_wait > 0:
            raise ConfigError(f"run config 'node-wait' must be > 0 seconds (got {self.node_wait})")
        self._check_failures()
        if self.checkpoint_every < 0:
            raise ConfigError(f"run config 'checkpoint-every' must be >= 0 (got {self.checkpoint_every})")
        if self.central_dp:
            if bool(self.central_noise_multiplier > 0) == bool(self.central_target_epsilon > 0):
                raise ConfigError("run config 'central-dp' needs exactly one of 'central-noise-multiplier' and "
                                  "'central-target-epsilon' > 0")
            if not self.central_clipping_norm > 0:
                raise ConfigError(f"run config 'central-clipping-norm' must be > 0 (got {self.central_clipping_norm})")
            if not 0 <= self.central_delta < 1:  # 0: the default, min(1e-5, 0.01 / clients)
                raise ConfigError(f"run config 'central-delta' must be in (0, 1), or 0 for the default "
                                  f"(got {self.central_delta})")
            if self.federated.weighting != "users":
                raise ConfigError("'central-dp' needs weighting 'users' (a client's weight must not depend on its "
                                  "users' data)")
            if self.federated.dp:
                raise ConfigError("choose local DP (noise-multiplier / target-epsilon) or 'central-dp', not both")
        elif self.central_noise_multiplier or self.central_target_epsilon:
            raise ConfigError("run config 'central-noise-multiplier' / 'central-target-epsilon' need 'central-dp = true'")
        if self.secure_aggregation and self.central_dp:
            raise ConfigError("'secure-aggregation' cannot be combined with 'central-dp' (the server must see "
                              "each client's update to clip it); use local DP with secure aggregation")
        if not self.secagg_clipping_range > 0:
            raise ConfigError(f"run config 'secagg-clipping-range' must be > 0 (got {self.secagg_clipping_range})")
        if self.secure_aggregation or self.central_dp:
            from fedrec.federated.registry import ALGORITHMS

            limits = getattr(ALGORITHMS.create(self.algorithm), "unsupported_transport", ()) \
                if self.algorithm in ALGORITHMS.names() else ()
            for key, on in (("secure-aggregation", self.secure_aggregation), ("central-dp", self.central_dp)):
                if on and key in limits:
                    raise ConfigError(f"algorithm '{self.algorithm}' does not support '{key}' (each client sends the "
                                      "rows of its own common users, not a fixed set of parameters)")
        self._check_attack()
        guarded = [key for key, on in (("secure-aggregation", self.secure_aggregation),
                                       ("central-dp", self.central_dp), ("robust", self.robust != "none")) if on]
        if self.federated.item_aggregation == "touched" and guarded:
            raise ConfigError(f"'item-aggregation = touched' cannot be combined with '{guarded[0]}' (the server "
                              "averages each item row over the clients that read it, from per-row counts "
                              f"that {guarded[0]} does not cover); use item-aggregation=all or auto")
        if self.federated.item_aggregation == "auto" and (guarded or self.federated.dp):
            self.federated.item_aggregation = "all"  # what auto means here (FederatedConfig.item_aggregation)
        if (self.checkpoint_every or self.resume) and not self.checkpoint_dir:
            raise ConfigError("run config 'checkpoint-every' / 'resume' need 'checkpoint-dir'")

    def _check_attack(self) -> None:
        """The attack and defence options (:mod:`fedrec.federated.robust`)."""
        from fedrec.federated.robust import ATTACKS, DEFENCES

        if self.attack not in ATTACKS:
            raise ConfigError(f"run config 'attack' must be one of {', '.join(ATTACKS)} (got {self.attack!r})")
        if self.robust not in DEFENCES:
            raise ConfigError(f"run config 'robust' must be one of {', '.join(DEFENCES)} (got {self.robust!r})")
        if not 0 <= self.attack_fraction < 1:
            raise ConfigError(f"run config 'attack-fraction' must be in [0, 1) (got {self.attack_fraction})")
        if self.attack != "none" and not self.attack_fraction > 0:
            raise ConfigError(f"run config 'attack' {self.attack!r} needs 'attack-fraction' > 0 (the share of "
                              "malicious clients)")
        if not (np.isfinite(self.attack_scale) and self.attack_scale != 0):
            raise ConfigError(f"run config 'attack-scale' must be a finite non-zero factor (got {self.attack_scale})")
        if not 0 <= self.robust_fraction < 0.5:
            raise ConfigError(f"run config 'robust-fraction' must be in [0, 0.5) (got {self.robust_fraction})")
        if not self.robust_norm >= 0:
            raise ConfigError(f"run config 'robust-norm' must be >= 0 (0: the median norm of the round) "
                              f"(got {self.robust_norm})")
        # options that would be accepted and then ignored
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, used, by in (("attack_scale", self.attack in ("scale", "item-promotion"), "attack scale or item-promotion"),
                              ("robust_fraction", self.robust in ("trimmed-mean", "krum", "multi-krum"),
                               "robust trimmed-mean, krum or multi-krum"),
                              ("robust_norm", self.robust == "norm-bound", "robust norm-bound")):
            if getattr(self, key) != defaults[key] and not used:
                raise ConfigError(f"run config '{key.replace('_', '-')}' is used only with {by}: it would be ignored")
        if self.attack == "label-flip" and self.task != "ctr":
            raise ConfigError(f"run config 'attack' label-flip flips click labels: it needs task 'ctr' "
                              f"(got {self.task!r})")
        uses = [k for k, on in (("robust", self.robust != "none"), ("attack", self.attack_fraction > 0)) if on]
        if uses and (self.secure_aggregation or self.central_dp):
            other = "secure-aggregation" if self.secure_aggregation else "central-dp"
            raise ConfigError(f"run config '{uses[0]}' cannot be combined with '{other}' (a defence needs each "
                              "client's own update; the attack simulation is measured without it)")
        if uses and self.task == "cdr":
            raise ConfigError(f"run config '{uses[0]}' is not supported for cross-domain runs (task 'cdr': each "
                              "client sends the rows of its own users)")

    def _check_failures(self) -> None:
        """The simulated-failure options (:mod:`fedrec.federated.failures`)."""
        for key in ("client_failure", "stragglers"):
            value = getattr(self, key)
            if not 0 <= value < 1:  # NaN fails too
                raise ConfigError(f"run config '{key.replace('_', '-')}' must be a fraction in [0, 1) (got {value})")
        if not 0 <= self.straggler_delay < float("inf"):
            raise ConfigError(f"run config 'straggler-delay' must be >= 0 seconds (got {self.straggler_delay})")
        if self.stragglers > 0 and not self.straggler_delay > 0:
            raise ConfigError("run config 'stragglers' needs 'straggler-delay' > 0 (the seconds a straggler's reply "
                              "comes late)")
        if self.straggler_delay > 0 and not self.stragglers > 0:
            raise ConfigError("run config 'straggler-delay' is given but 'stragglers' is 0 (no client straggles)")
        if not (self.client_failure > 0 or self.stragglers > 0):
            return
        for key, on in (("secure-aggregation", self.secure_aggregation), ("central-dp", self.central_dp)):
            if on:
                raise ConfigError(f"run config 'client-failure' / 'stragglers' cannot be combined with '{key}' "
                                  + ("(a SecAgg+ round stops when a client drops)" if key == "secure-aggregation"
                                     else "(its noise is calibrated for all 'shards' clients)"))
        if self.shards:
            from fedrec.federated.failures import check_failure_counts

            check_failure_counts(client_failure=self.client_failure, stragglers=self.stragglers, clients=self.shards,
                                 min_nodes=self.min_nodes)

    def key(self) -> str:
        """A stable string identifying what a client builds from this spec (data, model,
        algorithm, partition) — for caches."""
        d = dataclasses.asdict(self)
        for k in ("out", "checkpoint_dir", "checkpoint_every", "resume", "model_dir", "min_nodes", "round_timeout",
                  "node_wait", "client_failure", "stragglers", "straggler_delay"):
            d.pop(k)
        return json.dumps(d, sort_keys=True, default=str)

    def to_flat(self) -> dict[str, Any]:
        """Back to flat kebab-case keys (round-trips through :func:`parse_run_config`)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("federated", "model_options"):
                continue
            out[f.name.replace("_", "-")] = getattr(self, f.name)
        for f in dataclasses.fields(FederatedConfig):
            out[f.name.replace("_", "-")] = getattr(self.federated, f.name)
        for k, v in self.model_options.items():
            out[f"model.{k}"] = v
        return out

    def flower_config(self) -> dict[str, Any]:
        """Flat keys for ``flwr run --run-config``: model options as one ``model-options``
        string (Flower accepts only keys declared in pyproject.toml)."""
        out = {k: (",".join(map(str, v)) if isinstance(v, (list, tuple)) else v)  # Flower: scalars only
               for k, v in self.to_flat().items() if not k.startswith("model.")}
        out["model-options"] = ",".join(f"{k}={_plain(v)}" for k, v in self.model_options.items())
        return out


def parse_run_config(config: Mapping[str, Any]) -> RunSpec:
    """Flat keys -> :class:`RunSpec`; an unknown key is an error naming it."""
    own = {f.name for f in dataclasses.fields(RunSpec)} - {"federated", "model_options"}
    fed = {f.name for f in dataclasses.fields(FederatedConfig)}
    mine: dict[str, Any] = {}
    fed_opts: dict[str, Any] = {}
    model_opts: dict[str, Any] = {}
    for key, value in config.items():
        if key == "model-options":
            model_opts.update(_parse_pairs(str(value)))
            continue
        if key.startswith("model."):
            model_opts[key[len("model."):]] = value
            continue
        name = key.replace("-", "_")
        if name in own:
            mine[key] = value
        elif name in fed:
            fed_opts[key] = value
        else:
            known = sorted({k.replace("_", "-") for k in own | fed}) + ["model-options", "model.<option>"]
            raise ConfigError(f"run config: unknown key '{key}' (known: {', '.join(known)})")
    federated = build_config(FederatedConfig, fed_opts, where="run config")
    spec = build_config(RunSpec, mine, where="run config", federated=federated)
    spec.model_options = model_opts
    return spec


def _plain(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _parse_pairs(text: str) -> dict[str, Any]:
    """``"groups=2 item-repr=id"`` -> ``{"groups": 2, "item-repr": "id"}`` (values read as
    TOML scalars, as ``--set`` reads them: :func:`fedrec.config.parse_scalar`)."""
    from fedrec.config import parse_scalar

    out = {}
    for item in text.replace(",", " ").split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"run config 'model-options': expected KEY=VALUE items, got {item!r}")
        out[key.strip()] = parse_scalar(value.strip())
    return out
