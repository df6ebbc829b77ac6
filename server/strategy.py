"""The Strategy of fedrec: Flower's FedAvg machinery for sampling and messaging, with
aggregation by parameter role (:func:`fedrec.federated.algorithm.aggregate_uploads`).

* ``configure_train`` adds ``round`` and the last round's per-layer group counts (the share
  ``f`` of MRFF's balance loss) to the train config; every node takes part (user-level
  participation is drawn inside the clients, identically in every runtime).
* ``aggregate_train``: public parameters = weighted sum / weight; each group = sum over its
  members / members, unchanged when nobody chose it.
* ``aggregate_evaluate``: pooled valid/test metrics from client summaries; the best round on
  validation and early stopping are tracked in :class:`fedrec.federated.history.RunHistory`.
* With ``central=(noise_multiplier, delta)`` (central DP: the strategy is wrapped by
  :class:`CentralDPFixedClipping`), clients send mean models, the wrapper clips each
  client's update and adds the noise, and this strategy averages the clipped client models
  with **equal weights** (groups included), as the wrapper's noise calibration assumes.
* With ``checkpoint=(folder, every)``, the server state is saved at the end of every
  ``every``-th round (:mod:`fedrec.federated.checkpoint`); ``round_offset`` continues a
  resumed run's numbering (Flower counts the rounds of each ``start`` from 1).
"""

from __future__ import annotations

from typing import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from fedrec.federated.algorithm import aggregate_uploads
from fedrec.federated.checkpoint import save_server
from fedrec.federated.history import RunHistory
from fedrec.federated.layout import Layout
from fedrec.federated.node import combine_evaluation, params_to_record, record_to_params, replies_to_uploads
from fedrec.federated.privacy import central_epsilon

__all__ = ["RoleAwareStrategy", "CentralDPFixedClipping"]


def _metric_record(values: dict) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and v is not None})


class RoleAwareStrategy(FedAvg):
    """FedAvg whose aggregation reads parameter roles (see the module docstring)."""

    def __init__(self, *, layout: Layout, history: RunHistory, num_nodes: int, round_offset: int = 0,
                 group_counts: torch.Tensor | None = None, checkpoint: tuple[str, int] | None = None,
                 central: tuple[float, float] | None = None) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=num_nodes,
                         min_evaluate_nodes=num_nodes, min_available_nodes=num_nodes)
        self.layout = layout
        self.num_nodes = num_nodes
        self.history = history
        self.group_counts = (group_counts.clone() if group_counts is not None
                             else torch.zeros(layout.layers, layout.n_groups, dtype=torch.float64))
        self.round_offset = round_offset
        self.checkpoint = checkpoint
        self.central = central
        self._global: dict[str, torch.Tensor] | None = None
        self._latest: dict[str, torch.Tensor] | None = None
        self._saved_round = round_offset

    def _end_of_round(self, round: int) -> None:
        """Save the server state after ``round`` when it is a checkpoint round."""
        if not self.checkpoint or self._latest is None or round <= self._saved_round:
            return
        folder, every = self.checkpoint
        if every and round % every == 0:
            save_server(folder, round=round, global_params=self._latest, group_counts=self.group_counts,
                        history=self.history.state_dict())
            self._saved_round = round

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Send the global parameters, the round and the group counts to every node."""
        if self.history.stopped:
            return []
        self._global = record_to_params(arrays)
        config = ConfigRecord({**dict(config), "round": server_round + self.round_offset,
                               "group-counts": [float(x) for x in self.group_counts.reshape(-1).tolist()]})
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Role-aware aggregation of the uploads."""
        replies = list(replies)
        if not replies or self._global is None:
            return None, None
        uploads = replies_to_uploads(replies, self.layout)
        new, counts, metrics = aggregate_uploads(self.layout, self._global, uploads)
        if self.central is not None:
            # the uploads are the clients' (clipped) mean models: equal-weight average
            new = {n: (sum(u.sums[n].to(torch.float64) for u in uploads) / len(uploads)).to(self._global[n].dtype)
                   for n in self._global}
            sigma, delta = self.central
            metrics["epsilon"] = central_epsilon(noise_multiplier=sigma, rounds=server_round + self.round_offset,
                                                 delta=delta)
            metrics["noise-multiplier"], metrics["delta"] = sigma, delta
        self.group_counts = counts
        self._latest = new
        record = dict(metrics)
        if counts.numel():
            record["group-counts"] = counts.tolist()  # users per group, per layer
        self.history.record_train(server_round + self.round_offset, record)
        return params_to_record(new), _metric_record(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Evaluate on evaluation rounds only (every ``eval-every`` rounds and the last)."""
        rnd = server_round + self.round_offset
        if self.history.stopped and not any(r["round"] == rnd and "train" in r for r in self.history.rounds):
            return []
        if not self.history.should_evaluate(rnd):
            self._end_of_round(rnd)
            return []
        config = ConfigRecord({**dict(config), "round": rnd})
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Pooled valid/test metrics; updates the best round."""
        replies = list(replies)
        if not replies:
            return None
        pooled = combine_evaluation(replies)
        self.history.record_eval(server_round + self.round_offset, pooled["valid"], pooled["test"])
        self._end_of_round(server_round + self.round_offset)
        return _metric_record({f"{s}.{k}": v for s in ("valid", "test") for k, v in pooled[s].items()})


class CentralDPFixedClipping(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping central DP around a :class:`RoleAwareStrategy`:
    each client's ``model - global`` is clipped to ``clipping_norm``, the inner strategy
    averages, then Gaussian noise ``noise_multiplier * clipping_norm / clients`` is added.
    The inner strategy is told the noised parameters (for its checkpoints)."""

    def __init__(self, inner: RoleAwareStrategy, *, noise_multiplier: float, clipping_norm: float,
                 num_sampled_clients: int) -> None:
        super().__init__(inner, noise_multiplier=noise_multiplier, clipping_norm=clipping_norm,
                         num_sampled_clients=num_sampled_clients)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip, average (inner strategy), add noise; keep the inner strategy's view current."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.strategy._latest = record_to_params(arrays)
        return arrays, metrics
