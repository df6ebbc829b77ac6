"""The Strategy of fedrec: Flower's FedAvg machinery for sampling and messaging, with
aggregation by parameter role (:func:`fedrec.federated.algorithm.aggregate_uploads`).

* ``configure_train`` adds ``round`` and the last round's per-layer group counts (the share
  ``f`` of MRFF's balance loss) to the train config; every node takes part (user-level
  participation is drawn inside the clients, identically in every runtime).
* ``aggregate_train``: public parameters = weighted sum / weight; each group = sum over its
  members / members, unchanged when nobody chose it.
* With ``robust=(method, fraction, norm)`` the weighted means are replaced, role by role,
  by a robust aggregate (median, trimmed mean, Krum, Multi-Krum, norm bound:
  :func:`fedrec.federated.robust.robust_aggregate`).
* ``aggregate_evaluate``: pooled valid/test metrics from client summaries; the best round on
  validation and early stopping are tracked in :class:`fedrec.federated.history.RunHistory`.
* With ``central=(noise_multiplier, delta)`` (central DP: the strategy is wrapped by
  :class:`CentralDPFixedClipping`), clients send mean models, the wrapper clips each
  client's update and adds the noise, and this strategy averages the clipped client models
  with **equal weights** (groups included) over the run's fixed number of clients (a client
  that did not reply counts as a zero update), as the wrapper's noise calibration assumes.
* Nodes may fail: a round goes on with the nodes that replied, as long as at least
  ``min_nodes`` did (else the run stops with an error); the history records per round which
  clients replied (``train.clients``) and which nodes failed (``train.failed``, with the
  reason), for training and evaluation. A node that comes back (a new node id) is asked for
  its info and takes part again.
* With ``failures`` (a :class:`fedrec.federated.failures.FailurePlan`: the run options
  ``client-failure`` / ``stragglers``), ``configure_train`` tells the round's drawn clients to
  fail or to reply late; ``train.failed`` gives their reasons, ``train.stragglers`` the
  round's stragglers, and unless ``min_nodes`` is set a training round needs only the
  clients not drawn.
* ``best_params``: the global parameters of the best validation round so far (the model a
  run saves with ``model-dir``); ``configure_train`` tells the clients that round
  (``best-round``) so they save their private state of it.
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

from fedrec.errors import FedrecError
from fedrec.federated.algorithm import aggregate_uploads
from fedrec.federated.checkpoint import save_server
from fedrec.federated.failures import FailurePlan
from fedrec.federated.history import RunHistory
from fedrec.federated.layout import Layout
from fedrec.federated.node import combine_evaluation, params_to_record, record_to_params, replies_to_uploads
from fedrec.federated.privacy import central_epsilon
from fedrec.federated.robust import robust_aggregate

__all__ = ["RoleAwareStrategy", "CentralDPFixedClipping"]


def _metric_record(values: dict) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and v is not None})


class RoleAwareStrategy(FedAvg):
    """FedAvg whose aggregation reads parameter roles (see the module docstring)."""

    def __init__(self, *, layout: Layout, history: RunHistory, num_nodes: int, round_offset: int = 0,
                 group_counts: torch.Tensor | None = None, checkpoint: tuple[str, int] | None = None,
                 central: tuple[float, float] | None = None, min_nodes: int = 0,
                 node_clients: dict[int, int] | None = None, robust: tuple[str, float, float] | None = None,
                 failures: FailurePlan | None = None) -> None:
        self.min_nodes = min_nodes or num_nodes
        #: simulated failures and stragglers; a training round needs the clients not drawn
        self.failures = failures if failures is not None and failures.active else None
        self.min_train_replies = min_nodes or (num_nodes - self.failures.missing(num_nodes) if self.failures
                                             else num_nodes)
        self._simulated: dict[int, str] = {}  # node -> why its train reply may be missing (simulated)
        self._stragglers: list[dict] = []
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=self.min_nodes,
                         min_evaluate_nodes=self.min_nodes, min_available_nodes=self.min_nodes)
        #: node id -> client id (from the nodes' info replies)
        self.node_clients: dict[int, int] = dict(node_clients or {})
        self._sent: dict[str, list[int]] = {}
        self.best_params: dict[str, torch.Tensor] | None = None
        self.best_counts: torch.Tensor | None = None
        self.best_round = int(history.best["round"]) if history.best else 0
        self.layout = layout
        self.num_nodes = num_nodes
        self.history = history
        self.group_counts = (group_counts.clone() if group_counts is not None
                             else torch.zeros(layout.layers, layout.n_groups, dtype=torch.float64))
        self.round_offset = round_offset
        self.checkpoint = checkpoint
        self.central = central
        #: the defence ``(method, fraction, norm)`` (:mod:`fedrec.federated.robust`), or None
        self.robust = robust if robust and robust[0] != "none" else None
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

    def _learn_nodes(self, grid: Grid, node_ids: list[int]) -> None:
        """Ask nodes never seen before (a restarted node has a new id) for their info."""
        new = [n for n in node_ids if n not in self.node_clients]
        if not new:
            return
        from fedrec.federated.node import query_nodes

        for node, info in query_nodes(grid, new, kind="info").items():
            self.node_clients[node] = int(info.get("client", -1))

    def _check(self, replies: list[Message], stage: str, rnd: int) -> tuple[list[Message], dict]:
        """The good replies, and who replied and who failed (for the history); an error when
        fewer than ``min_nodes`` replied."""
        good = [r for r in replies if not r.has_error()]
        sent = self._sent.pop(stage, [m.metadata.src_node_id for m in replies])
        replied = {r.metadata.src_node_id for r in good}
        reasons = {r.metadata.src_node_id: r.error.reason for r in replies if r.has_error()}
        simulated = self._simulated if stage == "train" else {}
        failed = [{"node": int(n), "client": self.node_clients.get(n, -1),
                   "reason": reasons.get(n, simulated.get(n, "no reply before the round's timeout"))}
                  for n in sent if n not in replied]
        failed.sort(key=lambda f: (f["client"], f["node"]))  # Flower samples the nodes in random order
        record: dict = {"clients": sorted(self.node_clients.get(r.metadata.src_node_id, -1) for r in good)}
        if stage == "train" and self._stragglers:
            record["stragglers"] = self._stragglers  # every straggler of the round, on time or not
        restored = [{"client": self.node_clients.get(r.metadata.src_node_id, -1),
                     "round": int(r.content["metrics"]["restored-from"])}
                    for r in good if "metrics" in r.content.metric_records
                    and "restored-from" in r.content["metrics"]]
        if restored:
            record["restored"] = restored  # nodes that came back and took their state from a checkpoint
        if failed:
            record["failed"] = failed
        known = {c for c in self.node_clients.values() if c >= 0}
        absent = sorted(known - set(record["clients"]) - {f["client"] for f in failed})
        if absent:
            record["absent"] = absent  # known clients not connected this round (not asked)
        need = self.min_train_replies if stage == "train" else self.min_nodes
        if len(good) < need:
            unplanned = [f for f in failed if f["node"] not in simulated]
            why = (unplanned or failed)[0]["reason"] if failed else "no node replied"
            raise FedrecError(f"round {rnd} ({stage}): {len(good)} node(s) replied, fewer than min-nodes "
                              f"{need} ({why})")
        return good, record

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Send the global parameters, the round, the group counts and the best round so far
        to every available node."""
        if self.history.stopped:
            return []
        self._global = record_to_params(arrays)
        config = ConfigRecord({**dict(config), "round": server_round + self.round_offset,
                               "group-counts": [float(x) for x in self.group_counts.reshape(-1).tolist()],
                               "best-round": self.best_round})
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._learn_nodes(grid, [m.metadata.dst_node_id for m in messages])
        self._sent["train"] = [m.metadata.dst_node_id for m in messages]
        if self.failures is not None:  # simulated failures and stragglers of this round
            messages, self._simulated, self._stragglers = self.failures.mark(messages, self.node_clients,
                                                                             server_round + self.round_offset)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Role-aware aggregation of the uploads of the nodes that replied."""
        replies = list(replies)
        if self._global is None or (self.history.stopped and not replies):
            return None, None  # stopped early: the remaining rounds send nothing
        replies, nodes = self._check(replies, "train", server_round + self.round_offset)
        uploads = replies_to_uploads(replies, self.layout)
        if self.robust is not None:
            method, fraction, norm = self.robust
            new, counts, metrics = robust_aggregate(self.layout, self._global, uploads, method=method,
                                                    fraction=fraction, norm=norm)
        else:
            new, counts, metrics = aggregate_uploads(self.layout, self._global, uploads)
        if self.central is not None:
            # the uploads are the clients' (clipped) mean models: equal-weight average over the
            # run's fixed number of clients, the wrapper's noise calibration (a client that did
            # not reply counts as a zero update, so the sum's noise stays noise * norm)
            missing = max(0, self.num_nodes - len(uploads))
            new = {n: ((sum(u.sums[n].to(torch.float64) for u in uploads) + missing * self._global[n].to(torch.float64))
                       / (len(uploads) + missing)).to(self._global[n].dtype)
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
        record.update(nodes)
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
        # the round's users per group: clients route only to groups trained in this round
        config = ConfigRecord({**dict(config), "round": rnd,
                               "group-counts": [float(x) for x in self.group_counts.reshape(-1).tolist()]})
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._learn_nodes(grid, [m.metadata.dst_node_id for m in messages])
        self._sent["evaluate"] = [m.metadata.dst_node_id for m in messages]
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Pooled valid/test metrics of the nodes that replied; updates the best round."""
        replies = list(replies)
        if not replies:
            return None
        rnd = server_round + self.round_offset
        replies, nodes = self._check(replies, "evaluate", rnd)
        pooled = combine_evaluation(replies)
        self.history.record_eval(rnd, pooled["valid"], pooled["test"], nodes=nodes)
        if self.history.best is not None and self.history.best["round"] == rnd and self._latest is not None:
            self.best_params = {k: v.clone() for k, v in self._latest.items()}
            self.best_counts = self.group_counts.clone()
            self.best_round = rnd
        self._end_of_round(rnd)
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
