"""Translation between Flower records and the algorithm interface, for both sides.

The Flower apps in ``clients/`` and ``server/`` are thin: they call these functions. Records
(names are the protocol):

server -> client (train)
    ``arrays`` (ArrayRecord: global parameters), ``config`` (ConfigRecord: ``round``,
    ``group-counts`` flattened ``(layers, G)`` floats).
client -> server (train)
    ``arrays`` (the upload's sums), ``metrics`` (MetricRecord: ``num-examples``, ``weight``,
    ``users``, ``examples``, ``loss-sum``, ``shard``, ``group-counts``, and ``epsilon`` under
    differential privacy). With ``central-dp`` the arrays are the client's means instead
    (:func:`fedrec.federated.privacy.client_means`) and ``num-examples`` is 1.
server -> client (evaluate)
    ``arrays``, ``config`` (``round``).
client -> server (evaluate)
    ``metrics``: the valid and test summaries (:mod:`fedrec.federated.evaluation`), keys
    prefixed ``valid.`` / ``test.``, plus ``num-examples`` and ``shard``.
server -> client (query ``init``)
    asks one client for the initial global parameters and the layout, so the server needs
    no data: reply ``arrays`` and ``layout`` (ConfigRecord).

Client private state lives in ``context.state["fedrec.private"]`` (ArrayRecord).
"""

from __future__ import annotations

import json
import threading
from typing import Any, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedrec.data import load_dataset
from fedrec.data.partition import dominant_item_feature, partition_users
from fedrec.data.split import split_dataset
from fedrec.errors import ConfigError, FedrecError
from fedrec.federated.algorithm import Algorithm, LocalState, Params, Shard, Upload
from fedrec.federated.checkpoint import load_client, save_client
from fedrec.federated.evaluation import combine_ctr, combine_ranking
from fedrec.federated.layout import Layout
from fedrec.federated.privacy import client_means
from fedrec.federated.registry import create_algorithm
from fedrec.federated.spec import RunSpec, parse_run_config, shard_of_node

__all__ = ["client_train", "client_evaluate", "client_init", "node_spec", "params_to_record", "record_to_params",
           "replies_to_uploads", "combine_evaluation", "layout_from_record", "shard_users", "secagg_vector",
           "secagg_result", "optional_secaggplus_mod"]

_PRIVATE = "fedrec.private"
_lock = threading.Lock()
_cache: dict[str, Any] = {}


# -- conversions -------------------------------------------------------------------------
def params_to_record(params: Params) -> ArrayRecord:
    """Parameters (name -> tensor) as an ArrayRecord."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in params.items()})


def record_to_params(record: ArrayRecord) -> Params:
    """Inverse of :func:`params_to_record`."""
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def _layout_record(layout: Layout) -> ConfigRecord:
    names = list(layout.groups)
    return ConfigRecord({"shared": list(layout.shared), "group-names": names,
                         "group-layer": [layout.groups[n][0] for n in names],
                         "group-index": [layout.groups[n][1] for n in names],
                         "layers": layout.layers, "groups": layout.n_groups})


def layout_from_record(record: ConfigRecord) -> Layout:
    """The server's view of the layout (shared and group names) from a client's reply."""
    names = list(record.get("group-names", []))
    groups = {n: (int(layer), int(g)) for n, layer, g in zip(names, record["group-layer"], record["group-index"], strict=True)}
    return Layout(tuple(record.get("shared", [])), groups, (), (), int(record["layers"]), int(record["groups"]))


# -- client side -------------------------------------------------------------------------
def node_spec(context: Context) -> RunSpec:
    """The run spec of this node: run config, with ``data`` overridden by the node config."""
    config = dict(context.run_config)
    if "data" in context.node_config:
        config["data"] = context.node_config["data"]
    return parse_run_config(config)


def _algorithm(spec: RunSpec) -> Algorithm:
    key = "alg:" + spec.key()
    with _lock:
        if key not in _cache:
            _cache.clear()  # one run at a time per process: drop the previous run's data and shards
            split = split_dataset(load_dataset(spec.data))
            _cache[key] = create_algorithm(spec.algorithm, split, task=spec.task, model=spec.model or None,
                                           model_options=spec.model_options, config=spec.federated)
        return _cache[key]


def shard_users(alg: Algorithm, spec: RunSpec, shard: int, shards: int) -> np.ndarray:
    """The users (global indices) of shard ``shard`` of ``shards``."""
    users = np.arange(1, alg.split.n_users + 1)
    labels = None
    if spec.partition == "dirichlet":
        # non-IID by the users' true group (synthetic data) or their dominant item category
        if alg.split.user_group is not None:
            labels = alg.split.user_group[users]
        elif alg.split.item_feature_names:
            labels = dominant_item_feature(alg.split, alg.split.item_feature_names[0])[users]
        else:
            raise ConfigError("partition 'dirichlet' needs user groups or item features to draw labels from")
    parts = partition_users(users, scheme=spec.partition, num_clients=shards, seed=spec.partition_seed,
                            alpha=spec.partition_alpha, labels=labels)
    return np.asarray(parts[shard], dtype=np.int64)


def _shard(alg: Algorithm, spec: RunSpec, context: Context) -> Shard:
    shard, shards = shard_of_node(context.node_config, spec)
    key = f"shard:{spec.key()}:{shard}:{shards}"
    with _lock:
        if key not in _cache:
            _cache[key] = alg.make_shard(shard_users(alg, spec, shard, shards))
        return _cache[key]


def _local_state(alg: Algorithm, shard: Shard, context: Context, *, spec: RunSpec | None = None,
                 round: int = 0) -> LocalState:
    if _PRIVATE in context.state:
        state = LocalState.from_state_dict(context.state[_PRIVATE].to_torch_state_dict())
    elif spec is not None and spec.resume and round > 1:
        # a resumed run: the state this node saved at the end of the previous round
        state = LocalState.from_state_dict(load_client(spec.checkpoint_dir, round=round - 1,
                                                       shard=shard_of_node(context.node_config, spec)[0]))
    else:
        return alg.initial_local(shard.users)
    if not np.array_equal(state.users, shard.users):
        raise RuntimeError("this node's saved private state belongs to other users than its shard")
    return state


def client_init(msg: Message, context: Context) -> RecordDict:
    """Reply to the server's ``init`` query: initial global parameters and the layout."""
    alg = _algorithm(node_spec(context))
    return RecordDict({"arrays": params_to_record(alg.initial_global()), "layout": _layout_record(alg.layout)})


def _train_round(alg: Algorithm, spec: RunSpec, shard: Shard, context: Context, global_params: Params, rnd: int,
                 counts: torch.Tensor | None) -> Upload:
    """One round of this node's users; persists (and checkpoints) the private state."""
    if counts is not None and counts.numel():
        counts = counts.reshape(alg.layout.layers, alg.layout.n_groups)
    else:
        counts = None
    state = _local_state(alg, shard, context, spec=spec, round=rnd)
    upload, state, _ = alg.client_update(global_params, state, shard, round=rnd, group_counts=counts)
    context.state[_PRIVATE] = ArrayRecord(state.state_dict())
    if spec.checkpoint_every and rnd % spec.checkpoint_every == 0:
        save_client(spec.checkpoint_dir, shard=shard_of_node(context.node_config, spec)[0], round=rnd,
                    state=state.state_dict())
    return upload


def client_train(msg: Message, context: Context) -> RecordDict:
    """One round of local training for this node's shard (see the module docstring)."""
    spec = node_spec(context)
    alg = _algorithm(spec)
    shard = _shard(alg, spec, context)
    if SECAGG_FITINS in msg.content.array_records:  # the masked-vector stage of SecAgg+
        return _client_train_secagg(alg, spec, shard, msg, context)
    config = msg.content["config"]
    global_params = record_to_params(msg.content["arrays"])
    counts = torch.tensor(list(config.get("group-counts", [])), dtype=torch.float64)
    upload = _train_round(alg, spec, shard, context, global_params, int(config["round"]), counts)
    extra = {k: float(v) for k, v in (upload.privacy or {}).items()}
    arrays = upload.sums
    if spec.central_dp:
        # Flower's central-DP wrapper clips each client's (model - global): send the means,
        # with equal weights (num-examples 1) as its noise calibration assumes
        arrays = client_means(alg.layout, global_params, upload)
    metrics = MetricRecord({**extra, "num-examples": 1 if spec.central_dp else int(upload.examples),
                            "weight": float(upload.weight), "users": int(upload.users),
                            "examples": int(upload.examples), "loss-sum": float(upload.loss_sum),
                            "shard": int(shard_of_node(context.node_config, spec)[0]),
                            "group-counts": [float(x) for x in upload.group_counts.reshape(-1).tolist()]})
    return RecordDict({"arrays": params_to_record(arrays), "metrics": metrics})


# -- secure aggregation (SecAgg+, Flower's legacy workflow) -------------------------------
SECAGG_FITINS = "fitins.parameters"


def secagg_vector(layout: Layout, upload: Upload, scale: float) -> list[np.ndarray]:
    """What a client masks under SecAgg+: per global name (layout order) its sum, then its
    group counts, then its weight, all divided by ``scale`` (the expected users per client,
    the same on every client). Every client enters with the same weight: SecAgg+ multiplies
    a client's vector by ``num_examples / max_weight`` before quantising, so unequal weights
    would cost precision. The workflow's average over clients then has every ratio the
    server needs (public sum / weight, group sum / members) without any client's own sums
    or counts; divided by ``scale`` the values stay O(parameter size), inside SecAgg+'s
    clipping range."""
    out = [(upload.sums[n].double() / scale).numpy() for n in layout.global_names]
    out.append((upload.group_counts.reshape(-1).double() / scale).numpy())
    out.append(np.array([upload.weight / scale]))
    return out


def secagg_result(layout: Layout, global_params: Params, vector: list[np.ndarray],
                  total_weight: float) -> tuple[Params, torch.Tensor]:
    """The new global parameters and total group counts from SecAgg+'s average of the
    clients' :func:`secagg_vector`; ``total_weight`` is the sum of the clients' weights."""
    names = layout.global_names
    w = float(np.asarray(vector[len(names) + 1]).reshape(-1)[0])  # mean weight / scale
    counts_rel = torch.from_numpy(np.asarray(vector[len(names)], dtype=np.float64)).reshape(layout.layers,
                                                                                            layout.n_groups)
    counts = (counts_rel / w * total_weight).round() if w > 0 else torch.zeros_like(counts_rel)
    new = {}
    for n, v in zip(names, vector[:len(names)], strict=True):
        t = torch.from_numpy(np.asarray(v, dtype=np.float64))
        if n in layout.groups:
            c = float(counts_rel[layout.groups[n]])
            new[n] = (t / c).to(global_params[n].dtype) if counts[layout.groups[n]] > 0 else global_params[n].clone()
        else:
            new[n] = (t / w).to(global_params[n].dtype) if w > 0 else global_params[n].clone()
    return new, counts


def _client_train_secagg(alg: Algorithm, spec: RunSpec, shard: Shard, msg: Message, context: Context) -> RecordDict:
    from flwr.compat.common import recorddict_compat as compat
    from flwr.compat.common.parameter import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common.typing import Code, FitRes, Status

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    arrays = parameters_to_ndarrays(fitins.parameters)
    global_params = {n: torch.from_numpy(np.array(a)) for n, a in zip(alg.layout.global_names, arrays, strict=True)}
    counts = torch.tensor(json.loads(str(fitins.config.get("group-counts", "[]"))), dtype=torch.float64)
    upload = _train_round(alg, spec, shard, context, global_params, int(fitins.config["round"]), counts)
    shards = shard_of_node(context.node_config, spec)[1]
    vector = secagg_vector(alg.layout, upload, scale=max(1.0, alg.split.n_users / shards))
    peak = max(float(np.abs(v).max()) for v in vector if v.size)
    if peak > spec.secagg_clipping_range:
        raise ConfigError(f"secure aggregation: an uploaded value reaches {peak:.3g}, beyond 'secagg-clipping-range' "
                          f"{spec.secagg_clipping_range:g} (raise it; the quantisation step grows with it)")
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vector), num_examples=1,
                 metrics={"users": int(upload.users), "weight": float(upload.weight),
                          "shard": int(shard_of_node(context.node_config, spec)[0]),
                          **{k: float(v) for k, v in (upload.privacy or {}).items()}})
    return compat.fitres_to_recorddict(res, keep_input=True)


def optional_secaggplus_mod(msg: Message, context: Context, call_next):
    """Flower's ``secaggplus_mod`` for SecAgg+ train messages; other messages pass through
    (so the ClientApp serves runs with and without secure aggregation)."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if msg.metadata.message_type == "train" and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def client_evaluate(msg: Message, context: Context) -> RecordDict:
    """Valid and test summaries of this node's users, each with its own model."""
    spec = node_spec(context)
    alg = _algorithm(spec)
    shard = _shard(alg, spec, context)
    global_params = record_to_params(msg.content["arrays"])
    state = _local_state(alg, shard, context)
    out: dict[str, Any] = {"shard": int(shard_of_node(context.node_config, spec)[0])}
    n = 0
    for stage in ("valid", "test"):
        summary = alg.client_evaluate(global_params, state, shard, stage=stage)
        n += int(summary["n"])
        out.update({f"{stage}.{k}": v for k, v in summary.items()})
    out["num-examples"] = n
    return RecordDict({"metrics": MetricRecord(out)})


# -- server side -------------------------------------------------------------------------
def _ok(replies: Iterable[Message]) -> list[Message]:
    replies = list(replies)
    errors = [r.error for r in replies if r.has_error()]
    if errors:
        raise FedrecError(f"{len(errors)} client(s) failed: {errors[0].reason}")
    return sorted(replies, key=lambda r: int(r.content["metrics"]["shard"]))


def replies_to_uploads(replies: Iterable[Message], layout: Layout) -> list[Upload]:
    """Uploads from train replies, in shard order (so sums run in a fixed order)."""
    uploads = []
    for r in _ok(replies):
        m = r.content["metrics"]
        counts = torch.tensor(list(m["group-counts"]), dtype=torch.float64).reshape(layout.layers, layout.n_groups)
        uploads.append(Upload(record_to_params(r.content["arrays"]), float(m["weight"]), counts, int(m["users"]),
                              int(m["examples"]), float(m["loss-sum"]),
                              {k: float(m[k]) for k in ("epsilon", "noise-multiplier", "delta")} if "epsilon" in m else None))
    return uploads


def combine_evaluation(replies: Iterable[Message]) -> dict[str, dict[str, float | None]]:
    """Pooled ``valid`` and ``test`` metrics from evaluate replies."""
    out = {}
    replies = _ok(replies)
    for stage in ("valid", "test"):
        summaries = [{k[len(stage) + 1:]: v for k, v in r.content["metrics"].items() if k.startswith(stage + ".")}
                     for r in replies]
        is_ctr = any("pos-bins" in s for s in summaries)
        out[stage] = combine_ctr(summaries) if is_ctr else combine_ranking(summaries)
    return out

