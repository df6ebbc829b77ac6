"""Secure aggregation of the uploads with Flower's SecAgg+ (legacy workflow, the only one
Flower 1.42 has), one round at a time.

Each client masks :func:`fedrec.federated.node.secagg_vector` (its sums, group counts and
weight, divided by a scale every client computes alike); ``SecAggPlusWorkflow`` returns only
the average over clients, from which :func:`fedrec.federated.node.secagg_result` rebuilds
the role-aware aggregate: public sum / weight, each group's sum over its members / members,
and the total group counts. The server never sees a single client's parameters or group
counts, only its weight (number of participating users), which it uses to report totals.
Values pass through SecAgg+'s quantisation (``secagg-clipping-range`` R, 2^22 levels: a
step of 2R / 2^22 per value and client), so the aggregate equals the plain one up to that
quantisation error (tested). Every node must answer every stage (the workflow is configured
with all nodes sharing keys with all, ``reconstruction_threshold`` 1.0): a node that drops
halts the round, and the run stops with an error naming it; resume it from its checkpoint.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.compat.common import recorddict_compat as compat
from flwr.compat.common.parameter import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.typing import FitIns
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from fedrec.federated.layout import Layout
from fedrec.federated.node import secagg_result

__all__ = ["secure_round"]


class _CollectingStrategy(LegacyFedAvg):
    """Legacy strategy for one SecAgg+ round: every node trains; keeps the securely
    aggregated vector and the clients' (clear) weights."""

    def __init__(self, num_nodes: int, config: dict[str, Any]) -> None:
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=num_nodes,
                         min_available_clients=num_nodes)
        self.config = config
        self.vector: list[np.ndarray] | None = None
        self.weights: list[float] = []
        self.users = 0
        self.privacy: dict[str, float] = {}

    def configure_fit(self, server_round, parameters, client_manager):
        """Every available node trains, with this round's config."""
        clients = client_manager.sample(num_clients=self.min_fit_clients, min_num_clients=self.min_fit_clients)
        return [(c, FitIns(parameters, dict(self.config))) for c in clients]

    def aggregate_fit(self, server_round, results, failures):
        """Keep the SecAgg+ aggregate (the same vector in every result) and the weights."""
        if failures or not results:
            raise RuntimeError(f"secure aggregation: {len(failures)} client(s) failed in round {server_round}")
        # after unmasking, every result carries the same aggregated vector
        self.vector = parameters_to_ndarrays(results[0][1].parameters)
        self.weights = [float(r.metrics.get("weight", 0.0)) for _, r in results]
        self.users = sum(int(r.metrics.get("users", 0)) for _, r in results)
        private = [r.metrics for _, r in results if "epsilon" in r.metrics]  # local DP under SecAgg+
        if private:
            self.privacy = {"epsilon": max(float(m["epsilon"]) for m in private),
                            "noise-multiplier": float(private[0]["noise-multiplier"]),
                            "delta": float(private[0]["delta"])}
        return results[0][1].parameters, {}


def secure_round(grid: Grid, context: Context, *, layout: Layout, global_params: dict[str, torch.Tensor],
                 round: int, group_counts: torch.Tensor, num_nodes: int, clipping_range: float,
                 best_round: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, float]]:
    """One training round whose uploads are summed under SecAgg+. Returns the new global
    parameters, the total group counts and round metrics."""
    config = {"round": int(round), "group-counts": json.dumps([float(x) for x in group_counts.reshape(-1).tolist()]),
              "nodes": int(num_nodes), "best-round": int(best_round)}
    strategy = _CollectingStrategy(num_nodes, config)
    manager = SimpleClientManager()
    for node_id in grid.get_node_ids():
        manager.register(GridClientProxy(node_id=node_id, grid=grid, run_id=grid.run.run_id))
    legacy = LegacyContext(context, strategy=strategy, client_manager=manager)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: int(round)})
    arrays = [global_params[n].detach().numpy() for n in layout.global_names]
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(ndarrays_to_parameters(arrays),
                                                                                       keep_input=True)
    # every client enters with weight 1 (max_weight 1: no precision lost to weighting)
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=1.0, max_weight=1.0,
                                  clipping_range=clipping_range)
    workflow(grid, legacy)
    if strategy.vector is None:
        raise RuntimeError(f"secure aggregation halted in round {round}: every node must answer every stage of "
                           "SecAgg+ (no dropout tolerance); resume the run from its checkpoint")
    total = float(sum(strategy.weights))
    new, counts = secagg_result(layout, global_params, strategy.vector, total)
    return new, counts, {"users": float(strategy.users), "loss": float("nan"), **strategy.privacy}
