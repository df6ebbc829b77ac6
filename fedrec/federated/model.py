"""A trained federated model, as a run with ``model-dir`` leaves it, put back to use.

The folder holds ``global.pt`` (the server's global parameters of the best validation round)
and ``client-<k>.pt`` files (each client's private state of that round, with its node config
and run config; in a deployment each lives on its client's machine). A client's view of the
model is the global parameters plus its own private ones, for its own users:
:func:`load_federated_model` rebuilds it from the client's own data (read again through its
node config: :mod:`fedrec.federated.nodedata`), :func:`evaluate_federated` scores it on the
valid and test stages exactly as the run did (pooled over the clients given), and
:meth:`ClientModel.scorer` serves ``fedrec recommend``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.errors import ConfigError
from fedrec.federated.algorithm import LocalState, Params
from fedrec.federated.checkpoint import load_model_dir
from fedrec.federated.evaluation import combine_ctr, combine_ranking
from fedrec.federated.history import _clean
from fedrec.federated.spec import parse_run_config

__all__ = ["ClientModel", "load_federated_model", "evaluate_federated"]


@dataclass
class ClientModel:
    """One client's view of a federated model: its node (data, algorithm, shard), the
    global parameters and its private state."""

    client: int
    node: Any
    global_params: Params
    state: LocalState
    path: str
    #: users per group in the saved round (routing goes only to groups trained in it)
    group_counts: Any = None

    @property
    def split(self):
        """The client's own split (its users; items from the catalogue)."""
        return self.node.data.split

    def scorer(self):
        """``score_fn(users) -> (len(users), n_items + 1)`` scores of every item after each
        user's whole history, each user with its own model (for ``fedrec recommend``)."""
        alg = self.node.alg

        def score(users: np.ndarray):
            return alg.score_items(self.global_params, self.state, np.asarray(users, dtype=np.int64),
                                   group_counts=self.group_counts)

        return score


def load_federated_model(folder: str | Path, *, clients: list[str | Path] | None = None,
                         node_config: dict[str, Any] | None = None,
                         device: str | None = None) -> tuple[dict[str, Any], list[ClientModel]]:
    """``(global model file, client models)`` of ``folder``; ``node_config`` overrides
    keys of every client's saved node config (e.g. a data path that moved); ``device``
    (``auto``, ``cpu``, ``cuda``, ...) where the clients' models compute (default: the
    run's own ``device`` option)."""
    from fedrec.federated.node import build_node

    glob, saved = load_model_dir(folder, clients=clients)
    out = []
    for c in saved:
        run_config = dict(c["run_config"])
        if device is not None:
            run_config["device"] = device
        spec = parse_run_config(run_config)
        config = {**c["node_config"], **(node_config or {})}
        node = build_node(spec, config)
        state = LocalState.from_state_dict(c["state"])
        if not np.array_equal(state.users, node.shard.users) or (
                state.raw_users is not None and not np.array_equal(state.raw_users,
                                                                   node.data.split.user_raw[state.users])):
            raise ConfigError(f"{c['path']}: the saved private state is for other users than the client's data "
                              f"({node.data.info.get('data')}) holds")
        missing = [n for n in node.alg.layout.global_names if n not in glob["global"]]
        if missing:
            raise ConfigError(f"{folder}: the global model lacks {missing[0]} (a model of another configuration)")
        out.append(ClientModel(int(c["client"]), node, glob["global"], state, c["path"], glob.get("group_counts")))
    return glob, sorted(out, key=lambda m: m.client)


def evaluate_federated(folder: str | Path, *, clients: list[str | Path] | None = None,
                       node_config: dict[str, Any] | None = None, device: str | None = None,
                       topk=None) -> dict[str, Any]:
    """Valid and test metrics of a saved federated model, pooled over the given clients
    (default: every client file in ``folder``) the way the server pools them; with all of a
    run's clients, they equal the run's own numbers at its best round. ``topk`` (a K list,
    ranking tasks) replaces the run's own."""
    import dataclasses

    from fedrec.federated.node import evaluation_summary

    glob, models = load_federated_model(folder, clients=clients, node_config=node_config, device=device)
    if topk is not None:
        if models and models[0].node.alg.task == "ctr":
            raise ConfigError(f"{folder}: a CTR model is scored on pooled impressions; topk does not apply")
        for m in models:  # the run's options but the K list (checked as the run config checks it)
            m.node.alg.config = dataclasses.replace(m.node.alg.config, topk=topk)
    summaries = [evaluation_summary(m.node.alg, m.node.shard, m.global_params, m.state, client=m.client,
                                    group_counts=m.group_counts) for m in models]
    task = models[0].node.alg.task
    combine = combine_ctr if task == "ctr" else combine_ranking
    out: dict[str, Any] = {"model_dir": str(folder), "round": int(glob["round"]), "task": task,
                           "clients": [m.client for m in models],
                           "algorithm": glob["run_config"].get("algorithm"),
                           "protocol": "pooled" if task == "ctr" else glob["run_config"].get("protocol")}
    for stage in ("valid", "test"):
        parts = [{k[len(stage) + 1:]: v for k, v in s.items() if k.startswith(stage + ".")} for s in summaries]
        out[stage] = _clean(combine(parts))  # rounded as the run's history rounds them
    out["run"] = glob.get("metrics", {})
    return out
