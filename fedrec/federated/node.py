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
    (:func:`fedrec.federated.privacy.client_means`) and ``num-examples`` is 1. Under local or
    central DP ``examples`` and ``loss-sum`` are not sent (data-dependent and unnoised) and
    ``num-examples`` is the number of users (1 under central DP); see
    :mod:`fedrec.federated.privacy` for what is sent and why.
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

import dataclasses
import json
import threading
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedrec.errors import ConfigError, FedrecError
from fedrec.federated.algorithm import Algorithm, LocalState, Params, Shard, Upload
from fedrec.federated.checkpoint import latest_client, save_client, save_client_model
from fedrec.federated.evaluation import combine_ctr, combine_ranking
from fedrec.federated.flower_errors import error_reason
from fedrec.federated.layout import Layout
from fedrec.federated.nodedata import NodeData, node_data, node_stamp
from fedrec.federated.privacy import client_means
from fedrec.federated.registry import create_algorithm
from fedrec.federated.spec import RunSpec, parse_run_config

__all__ = ["client_train", "client_skip_round", "client_evaluate", "client_query", "hello_info", "node_spec", "node_of",
           "build_node",
           "params_to_record", "record_to_params", "replies_to_uploads", "combine_evaluation", "layout_from_record",
           "evaluation_summary", "secagg_vector", "secagg_scale", "secagg_result", "optional_secaggplus_mod",
           "psi_query", "align_nodes"]

_PRIVATE = "fedrec.private"
_META = "fedrec.meta"
_PSI = "fedrec.psi"
_ALIGN = "fedrec.align"
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
                         "layers": layout.layers, "groups": layout.n_groups, "aligned": list(layout.aligned)})


def layout_from_record(record: ConfigRecord) -> Layout:
    """The server's view of the layout (shared and group names) from a client's reply."""
    names = list(record.get("group-names", []))
    groups = {n: (int(layer), int(g)) for n, layer, g in zip(names, record["group-layer"], record["group-index"], strict=True)}
    return Layout(tuple(record.get("shared", [])), groups, (), (), int(record["layers"]), int(record["groups"]),
                  tuple(record.get("aligned", [])))


# -- client side -------------------------------------------------------------------------
@dataclass
class _Node:
    """What a node builds once per run: its data, its algorithm and its shard."""

    data: NodeData
    alg: Algorithm
    shard: Shard
    #: a simulated malicious client (run option ``attack-fraction``)
    malicious: bool = False
    #: the catalogue index of the item whose exposure is measured (0: none)
    target: int = 0

    @property
    def client(self) -> int:
        return -1 if self.data.client is None else int(self.data.client)


def node_spec(context: Context) -> RunSpec:
    """The run spec of this node (its data comes from the node config: :func:`node_of`)."""
    return parse_run_config(dict(context.run_config))


def node_of(context: Context, spec: RunSpec | None = None) -> _Node:
    """This node's data, algorithm and shard (built once per run and node config, see
    :mod:`fedrec.federated.nodedata`): the algorithm is built on the node's own split, with
    the run's ``population`` completed from what the node knows. An algorithm that shares
    rows of common users gets the node's alignment (:func:`psi_query`) from its state."""
    spec = spec or node_spec(context)
    # a data file rewritten since (same name, other contents) builds the node afresh
    key = "node:" + spec.key() + json.dumps([dict(context.node_config), node_stamp(spec, context.node_config)],
                                            sort_keys=True, default=str)
    with _lock:
        if key not in _cache:
            if not any(k.startswith("node:" + spec.key()) for k in _cache):
                _cache.clear()  # one run at a time per process: drop the previous run's nodes
            _cache[key] = build_node(spec, context.node_config)
        node = _cache[key]
    if getattr(node.alg, "needs_alignment", False) and _ALIGN in context.state:
        node.alg.set_alignment(context.state[_ALIGN].to_torch_state_dict()["rows"].numpy())
    return node


def build_node(spec: RunSpec, node_config: dict[str, Any]) -> _Node:
    """A node's data, algorithm (on its own split) and shard (all of its users)."""
    nd = node_data(spec, node_config)
    config = dataclasses.replace(spec.federated, population=spec.federated.population or nd.population)
    alg = create_algorithm(spec.algorithm, nd.split, task=spec.task, model=spec.model or None,
                           model_options=spec.model_options, config=config)
    check_transport(spec, alg.layout, alg.name)
    node = _Node(nd, alg, alg.make_shard(np.arange(1, nd.split.n_users + 1)))
    _set_attack(node, spec, node_config)
    return node


def _set_attack(node: _Node, spec: RunSpec, node_config: dict[str, Any]) -> None:
    """Whether this node is a simulated malicious client, its target item, and what it does
    to its training batches (:mod:`fedrec.federated.robust`)."""
    from fedrec.federated import robust

    if not (spec.attack_fraction > 0 or spec.attack_target):
        return
    node.target = robust.target_index(node.data.split, spec.attack_target, seed=spec.federated.seed)
    if spec.attack_fraction > 0:
        clients = int(spec.shards or node_config.get("shards", node_config.get("num-partitions", 0)) or 0)
        bad = robust.malicious_clients(seed=spec.federated.seed, fraction=spec.attack_fraction, clients=clients)
        if not 0 <= node.client < clients:
            raise ConfigError(f"'attack-fraction': this node's client id ({node.client}) is not in 0..{clients - 1}; "
                              "give each node its 'shard' in its node config")
        node.malicious = node.client in set(bad.tolist())
    if node.malicious:
        node.alg.batch_transform = robust.poison_batch(spec.attack, node.target)


def check_transport(spec: RunSpec, layout: Layout, algorithm: str) -> None:
    """Refuse what the transport cannot do for this layout: secure aggregation (fixed-length
    vectors) and central DP (clipping whole-model updates) with aligned tables, whose rows
    sent depend on each client's users."""
    if layout.aligned and spec.secure_aggregation:
        raise ConfigError(f"algorithm '{algorithm}': secure aggregation is not supported (each client sends the rows "
                          "of its own common users, not a fixed-length vector)")
    if layout.aligned and spec.central_dp:
        raise ConfigError(f"algorithm '{algorithm}': central DP is not supported (it clips whole-model updates; the "
                          "aligned rows differ per client)")


def _meta(context: Context) -> dict[str, int]:
    """Rounds of the node's private state and of its saved model (persisted in context.state)."""
    if _META in context.state:
        return {k: int(v) for k, v in context.state[_META].items()}
    return {"state-round": 0, "saved-round": 0}


def _set_meta(context: Context, **values: int) -> None:
    context.state[_META] = ConfigRecord({**_meta(context), **{k.replace("_", "-"): int(v) for k, v in values.items()}})


def _local_state(node: _Node, context: Context, *, spec: RunSpec | None = None, round: int = 0) -> LocalState:
    """The node's private state: in memory (``context.state``); else, for a resumed run or a
    node restarted mid-run, its latest checkpoint; else the initial state."""
    alg, shard = node.alg, node.shard
    if _PRIVATE in context.state:
        state = LocalState.from_state_dict(context.state[_PRIVATE].to_torch_state_dict())
    elif spec is not None and spec.checkpoint_dir and round > 1 and (spec.resume or spec.checkpoint_every):
        found = latest_client(spec.checkpoint_dir, shard=_client_id(node, "checkpoint-dir"), before=round)
        if found is None:
            if spec.resume:
                raise ConfigError(f"resume: no checkpoint of client {node.client} before round {round} in "
                                  f"{spec.checkpoint_dir}")
            return alg.initial_local(shard.users)
        saved_round, saved = found
        state = LocalState.from_state_dict(saved)
        _set_meta(context, state_round=saved_round, restored_from=saved_round)
    else:
        return alg.initial_local(shard.users)
    _check_users(node, state)
    return state


def _check_users(node: _Node, state: LocalState) -> None:
    if not np.array_equal(state.users, node.shard.users):
        raise ConfigError("this node's saved private state belongs to other users than its data holds")
    raw = state.raw_users
    if raw is not None and not np.array_equal(raw, node.data.split.user_raw[state.users]):
        raise ConfigError("this node's saved private state belongs to other users than its data holds")


def _client_id(node: _Node, what: str) -> int:
    if node.data.client is None:
        raise ConfigError(f"'{what}' needs a client id for this node's files: add shard=K to its --node-config")
    return int(node.data.client)


def _save_model(node: _Node, spec: RunSpec, context: Context, best_round: int) -> None:
    """Save the node's private state as the model of ``best_round`` when the state is that
    round's (the best validation round) and not yet saved."""
    if not spec.model_dir or best_round <= 0:
        return
    meta = _meta(context)
    if meta["state-round"] != best_round or meta["saved-round"] == best_round or _PRIVATE not in context.state:
        return
    state = LocalState.from_state_dict(context.state[_PRIVATE].to_torch_state_dict())
    save_client_model(spec.model_dir, client=_client_id(node, "model-dir"), round=best_round,
                      state=state.state_dict(), node_config=dict(context.node_config), run_config=spec.to_flat(),
                      info=node.data.info)
    _set_meta(context, saved_round=best_round)


def client_info(node: _Node, spec: RunSpec | None = None) -> ConfigRecord:
    """What a node tells the server about its data (for the run's record); under DP (``spec``)
    without its interaction counts and data fingerprint (``UNNOISED_INFO``: for a one-user
    node, its history; a resume under DP then checks the catalogue, not each node's data)."""
    info = {k: v for k, v in node.data.info.items() if isinstance(v, (int, float, str, bool))}
    if spec is not None and _under_dp(spec):
        info = {k: v for k, v in info.items() if k not in UNNOISED_INFO}
    if node.target:
        info["attack-target"] = str(node.data.split.item_raw[node.target])
        info["malicious"] = bool(node.malicious)
    if getattr(node.alg, "needs_alignment", False):
        info["align"] = True  # the server runs the private set intersection first
    return ConfigRecord(info)


def hello_info(node_config: dict[str, Any]) -> ConfigRecord:
    """What a node's config says of the federation, without loading any data: its
    ``shard``/``shards`` and, in a Flower simulation, ``partition-id``/``num-partitions``
    (the number of simulated SuperNodes), for the server's wait for nodes."""
    return ConfigRecord({k: int(node_config[k]) for k in ("shard", "shards", "partition-id", "num-partitions")
                         if isinstance(node_config.get(k), int) and not isinstance(node_config.get(k), bool)})


def client_query(msg: Message, context: Context) -> RecordDict:
    """Reply to the server's queries (``config`` record ``kind``): ``hello`` — what the node
    config says of the federation's size (:func:`hello_info`, no data loaded); ``init`` (default) — the
    initial global parameters, the layout and the node's info; ``info`` — the info only;
    ``save-model`` — save the model of ``best-round`` (see :func:`_save_model`);
    ``psi-blind`` / ``psi-raise`` / ``psi-finish`` — the steps of the private set
    intersection (:func:`psi_query`)."""
    spec = node_spec(context)
    config = msg.content.config_records.get("config", ConfigRecord({}))
    kind = str(config.get("kind", "init"))
    if kind == "hello":
        return RecordDict({"info": hello_info(context.node_config)})
    node = node_of(context, spec)
    if kind == "save-model":
        _save_model(node, spec, context, int(config.get("best-round", 0)))
        return RecordDict({"info": client_info(node, spec)})
    if kind == "info":
        return RecordDict({"info": client_info(node, spec)})
    if kind.startswith("psi-"):
        return psi_query(node, kind, msg, context)
    if kind != "init":
        raise ConfigError(f"unknown query kind {kind!r}")
    return RecordDict({"arrays": params_to_record(node.alg.initial_global()), "layout": _layout_record(node.alg.layout),
                       "info": client_info(node, spec)})


def psi_query(node: _Node, kind: str, msg: Message, context: Context) -> RecordDict:
    """A node's steps of the private set intersection (:mod:`fedrec.federated.psi`):

    ``psi-blind``
        draw a secret key (kept in the node's own state) and reply with the node's users'
        hashed ids raised to it, in a secret random order (``arrays["set"]``);
    ``psi-raise``
        raise the other node's blinded set (``arrays["set"]``) to the node's key, in the
        order received;
    ``psi-finish``
        from its own set raised by the other node (``arrays["own"]``, in its own order) and
        the other node's set raised by itself (``arrays["other"]``), find its users held by
        both, number them by their doubly blinded values (the same order on both nodes) and
        keep that alignment in its state; reply with the number of common users
        (``info["common"]``).
    """
    from fedrec.federated import psi

    alg = node.alg
    if not getattr(alg, "needs_alignment", False):
        raise ConfigError(f"query {kind!r}: algorithm '{alg.name}' shares no rows of common users")
    if kind == "psi-blind":
        key = psi.new_key()
        order = psi.shuffle(len(alg.raw_users()))
        blinded = psi.blind(psi.hash_users(alg.raw_users()[order]), key)
        context.state[_PSI] = ConfigRecord({"key": str(psi.key_to_int(key))})
        context.state[_PSI + ".order"] = ArrayRecord({"order": torch.from_numpy(order)})
        return RecordDict({"arrays": ArrayRecord({"set": torch.from_numpy(psi.to_array(blinded))})})
    if _PSI not in context.state:
        raise ConfigError(f"query {kind!r} before 'psi-blind': this node has no key for the intersection")
    key = psi.key_from_int(int(context.state[_PSI]["key"]))
    arrays = msg.content.array_records.get("arrays")
    if arrays is None:
        raise ConfigError(f"query {kind!r}: the message has no arrays")
    sets = {k: v.numpy() for k, v in arrays.to_torch_state_dict().items()}
    if kind == "psi-raise":
        state = context.state[_PSI]
        if int(state.get("raised", 0)):  # one set per key: no second batch of chosen points
            raise ConfigError("psi-raise: this node has already raised a set with its key")
        raised = psi.blind(psi.from_array(sets["set"]), key)
        context.state[_PSI] = ConfigRecord({**dict(state), "raised": 1})
        return RecordDict({"arrays": ArrayRecord({"set": torch.from_numpy(psi.to_array(raised))})})
    if kind != "psi-finish":
        raise ConfigError(f"unknown query kind {kind!r}")
    order = context.state[_PSI + ".order"].to_torch_state_dict()["order"].numpy()
    own, other = psi.from_array(sets["own"]), psi.from_array(sets["other"])
    if len(own) != len(order):
        raise ConfigError(f"psi-finish: {len(own)} values for this node's {len(order)} users")
    hit = psi.intersect(own, other)
    rows = psi.shared_rows(len(order), order[hit], [own[i] for i in hit])
    del context.state[_PSI]  # the key and the order are not needed any more
    del context.state[_PSI + ".order"]
    context.state[_ALIGN] = ArrayRecord({"rows": torch.from_numpy(rows)})
    alg.set_alignment(rows)
    return RecordDict({"info": ConfigRecord({"common": int(len(hit)), "users": int(len(order))})})


def align_nodes(grid, node_ids: list[int], *, timeout: float | None = None) -> dict[str, int]:
    """Run the private set intersection between two nodes (the server only relays: it sees
    blinded values, the set sizes and the size of the intersection). Returns ``common``
    (users both nodes hold) and each node's ``users``. Errors are one line."""
    if len(node_ids) != 2:
        raise FedrecError(f"the private set intersection of users runs between two nodes ({len(node_ids)} connected)")

    def ask(kind: str, per_node: dict[int, dict[str, np.ndarray]] | None = None) -> dict[int, Message]:
        messages = []
        for n in node_ids:
            content = RecordDict({"config": ConfigRecord({"kind": kind})})
            if per_node is not None:
                content["arrays"] = ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v))
                                                 for k, v in per_node[n].items()})
            messages.append(Message(content, dst_node_id=int(n), message_type="query"))
        replies = {int(r.metadata.src_node_id): r for r in grid.send_and_receive(messages, timeout=timeout)}
        for n in node_ids:
            if n not in replies:
                raise FedrecError(f"private set intersection ({kind}): node {n} did not reply")
            if replies[n].has_error():
                raise FedrecError(f"private set intersection ({kind}): node {n} failed: "
                                  f"{error_reason(replies[n].error.reason)}")
        return replies

    def array(reply: Message, name: str) -> np.ndarray:
        return reply.content["arrays"].to_torch_state_dict()[name].numpy()

    a, b = node_ids
    blinded = {n: array(r, "set") for n, r in ask("psi-blind").items()}
    raised = {n: array(r, "set") for n, r in ask("psi-raise", {a: {"set": blinded[b]}, b: {"set": blinded[a]}}).items()}
    # raised[a] = b's set raised by a (in b's order); raised[b] = a's set raised by b
    done = ask("psi-finish", {a: {"own": raised[b], "other": raised[a]}, b: {"own": raised[a], "other": raised[b]}})
    common = {n: int(r.content["info"]["common"]) for n, r in done.items()}
    if common[a] != common[b]:  # pragma: no cover - the protocol is symmetric
        raise FedrecError(f"private set intersection: the nodes found {common[a]} and {common[b]} common users")
    return {"common": common[a], **{f"users-{n}": int(done[n].content["info"]["users"]) for n in node_ids}}


def _train_round(node: _Node, spec: RunSpec, context: Context, global_params: Params, rnd: int,
                 counts: torch.Tensor | None, best_round: int = 0) -> Upload:
    """One round of this node's users; persists (and checkpoints) the private state."""
    alg = node.alg
    _save_model(node, spec, context, best_round)  # the state is still the previous round's
    if counts is not None and counts.numel():
        counts = counts.reshape(alg.layout.layers, alg.layout.n_groups)
    else:
        counts = None
    state = _local_state(node, context, spec=spec, round=rnd)
    upload, state, _ = alg.client_update(global_params, state, node.shard, round=rnd, group_counts=counts)
    if node.malicious and (spec.attack == "scale" or (spec.attack == "item-promotion" and spec.attack_scale != 1)):
        from fedrec.federated.robust import boost_upload

        upload = boost_upload(alg.layout, global_params, upload, spec.attack_scale)
    state.raw_users = node.data.split.user_raw[state.users]
    context.state[_PRIVATE] = ArrayRecord(state.state_dict())
    _set_meta(context, state_round=rnd)
    if spec.checkpoint_every and rnd % spec.checkpoint_every == 0:
        save_client(spec.checkpoint_dir, shard=_client_id(node, "checkpoint-dir"), round=rnd, state=state.state_dict())
    return upload


def client_skip_round(msg: Message, context: Context) -> None:
    """A train round this node does not take part in (a simulated failure,
    :mod:`fedrec.federated.failures`): its private state stays as it is, but is the state
    of this round, so a checkpoint round still saves it and the model of the best round is
    still saved (kill-and-resume stays exact)."""
    spec = node_spec(context)
    node = node_of(context, spec)
    config = msg.content["config"]
    rnd = int(config["round"])
    _save_model(node, spec, context, int(config.get("best-round", 0)))
    state = _local_state(node, context, spec=spec, round=rnd)
    state.raw_users = node.data.split.user_raw[state.users]
    context.state[_PRIVATE] = ArrayRecord(state.state_dict())
    _set_meta(context, state_round=rnd)
    if spec.checkpoint_every and rnd % spec.checkpoint_every == 0:
        save_client(spec.checkpoint_dir, shard=_client_id(node, "checkpoint-dir"), round=rnd, state=state.state_dict())


def client_train(msg: Message, context: Context) -> RecordDict:
    """One round of local training for this node's shard (see the module docstring)."""
    spec = node_spec(context)
    node = node_of(context, spec)
    if SECAGG_FITINS in msg.content.array_records:  # the masked-vector stage of SecAgg+
        return _client_train_secagg(node, spec, msg, context)
    config = msg.content["config"]
    global_params = record_to_params(msg.content["arrays"])
    counts = torch.tensor(list(config.get("group-counts", [])), dtype=torch.float64)
    upload = _train_round(node, spec, context, global_params, int(config["round"]), counts,
                          int(config.get("best-round", 0)))
    extra = {k: float(v) for k, v in (upload.privacy or {}).items()}
    arrays = dict(upload.sums)
    for name, (rows, weights) in (upload.rows or {}).items():  # aligned tables: only the rows sent
        arrays[f"{name}@rows"] = rows
        arrays[f"{name}@weights"] = weights
    for name, weights in (upload.touched or {}).items():  # item-aggregation = touched: per-row reader weights
        arrays[f"{name}@touched"] = weights
    if spec.central_dp:
        # Flower's central-DP wrapper clips each client's (model - global): send the means,
        # with equal weights (num-examples 1) as its noise calibration assumes
        arrays = client_means(node.alg.layout, global_params, upload)
    meta = _meta(context)
    if meta.get("restored-from"):  # this node restarted and took its private state from a checkpoint
        extra["restored-from"] = meta["restored-from"]
        _set_meta(context, restored_from=0)
    metrics = MetricRecord({**extra, "num-examples": 1 if spec.central_dp else int(upload.examples),
                            "weight": float(upload.weight), "users": int(upload.users),
                            "examples": int(upload.examples), "loss-sum": float(upload.loss_sum),
                            "shard": node.client,
                            "group-counts": [float(x) for x in upload.group_counts.reshape(-1).tolist()]})
    if upload.group_changed is not None:  # how many of its users changed group since their last round
        metrics["group-changed"] = [float(x) for x in upload.group_changed.tolist()]
        metrics["routed-before"] = int(upload.routed_before)
    if _under_dp(spec):
        _drop_unnoised(metrics, users=int(upload.users), central=spec.central_dp)
    return RecordDict({"arrays": params_to_record(arrays), "metrics": metrics})


#: train-reply metrics that are data-dependent and unnoised: not sent under DP
UNNOISED_TRAIN_METRICS = ("examples", "loss-sum")
#: info-reply counts of a node's interactions: not sent under DP
#: (``data-fingerprint``: a hash of its rows, which would confirm a guessed history exactly)
UNNOISED_INFO = ("rows", "out-of-catalogue", "data-fingerprint")


def _under_dp(spec: RunSpec) -> bool:
    """Whether the run is under local (user-level) or central (client-level) DP."""
    return bool(spec.federated.dp or spec.central_dp)


def _drop_unnoised(metrics: MetricRecord, *, users: int, central: bool) -> None:
    """Under DP, remove the per-user values nothing noises (the training loss, the number of
    training targets: for a one-user client its history length); Flower's weighting key
    becomes the number of users (1 under central DP), which does not depend on data."""
    for key in UNNOISED_TRAIN_METRICS:
        if key in metrics:
            del metrics[key]
    metrics["num-examples"] = 1 if central else users


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


def secagg_scale(population: int, nodes: int) -> float:
    """The scale every client divides its SecAgg+ vector by: the expected users per node,
    from the run's ``population`` (the same on every node; no node can count it itself)."""
    if not population:
        raise ConfigError("secure aggregation scales the uploads by the users per node: set the run config's "
                          "'population' (the number of users in the whole federation)")
    return max(1.0, population / max(1, nodes))


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


def _client_train_secagg(node: _Node, spec: RunSpec, msg: Message, context: Context) -> RecordDict:
    from flwr.compat.common import recorddict_compat as compat
    from flwr.compat.common.parameter import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common.typing import Code, FitRes, Status

    alg = node.alg
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    arrays = parameters_to_ndarrays(fitins.parameters)
    global_params = {n: torch.from_numpy(np.array(a)) for n, a in zip(alg.layout.global_names, arrays, strict=True)}
    counts = torch.tensor(json.loads(str(fitins.config.get("group-counts", "[]"))), dtype=torch.float64)
    upload = _train_round(node, spec, context, global_params, int(fitins.config["round"]), counts,
                          int(fitins.config.get("best-round", 0)))
    vector = secagg_vector(alg.layout, upload, scale=secagg_scale(alg.config.population, int(fitins.config["nodes"])))
    peak = max(float(np.abs(v).max()) for v in vector if v.size)
    if peak > spec.secagg_clipping_range:
        raise ConfigError(f"secure aggregation: an uploaded value reaches {peak:.3g}, beyond 'secagg-clipping-range' "
                          f"{spec.secagg_clipping_range:g} (raise it; the quantisation step grows with it)")
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vector), num_examples=1,
                 metrics={"users": int(upload.users), "weight": float(upload.weight),
                          "shard": node.client,
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
    node = node_of(context, spec)
    global_params = record_to_params(msg.content["arrays"])
    config = msg.content.config_records.get("config", ConfigRecord({}))
    # a node restarted since it last trained restores its latest checkpoint of this round or before
    state = _local_state(node, context, spec=spec, round=int(config.get("round", 0)) + 1)
    counts = torch.tensor(list(config.get("group-counts", [])), dtype=torch.float64)
    # a simulated malicious client is not evaluated: the pooled metrics are the honest users'
    shard = node.alg.make_shard(np.zeros(0, dtype=np.int64)) if node.malicious else node.shard
    summary = evaluation_summary(node.alg, shard, global_params, state, client=node.client, group_counts=counts)
    if node.target:
        from fedrec.federated.robust import exposure_summary

        exposure = exposure_summary(node.alg, shard, global_params, state, target=node.target,
                                    ks=node.alg.config.topk, group_counts=counts)
        summary.update({f"test.{k}": v for k, v in exposure.items()})
    return RecordDict({"metrics": MetricRecord(summary)})


def evaluation_summary(alg: Algorithm, shard: Shard, global_params: Params, state: LocalState, *,
                       client: int, group_counts: torch.Tensor | None = None) -> dict[str, Any]:
    """A client's evaluate reply (valid and test summaries, ``num-examples``, ``shard``);
    ``group_counts``, the round's users per group, restricts routing to trained groups."""
    out: dict[str, Any] = {"shard": int(client)}
    n = 0
    for stage in ("valid", "test"):
        summary = alg.client_evaluate(global_params, state, shard, stage=stage, group_counts=group_counts)
        n += int(summary["n"])
        out.update({f"{stage}.{k}": v for k, v in summary.items()})
    out["num-examples"] = n
    return out


# -- server side -------------------------------------------------------------------------
def _ok(replies: Iterable[Message]) -> list[Message]:
    replies = list(replies)
    errors = [r.error for r in replies if r.has_error()]
    if errors:
        raise FedrecError(f"{len(errors)} client(s) failed: {error_reason(errors[0].reason)}")
    # a fixed order (client id, then node id), so the sums run in the same order every time
    return sorted(replies, key=lambda r: (int(r.content["metrics"]["shard"]), int(r.metadata.src_node_id)))


def query_nodes(grid, node_ids: Iterable[int], *, kind: str, timeout: float | None = None,
                **config: Any) -> dict[int, dict[str, Any]]:
    """Send a ``query`` of ``kind`` (``info``, ``save-model``) to ``node_ids``; the info
    each node replied with, by node id (nodes that fail are left out)."""
    messages = [Message(RecordDict({"config": ConfigRecord({"kind": kind, **config})}), dst_node_id=int(n),
                        message_type="query") for n in node_ids]
    if not messages:
        return {}
    out = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if not reply.has_error() and "info" in reply.content.config_records:
            out[int(reply.metadata.src_node_id)] = dict(reply.content["info"])
    return out


def replies_to_uploads(replies: Iterable[Message], layout: Layout) -> list[Upload]:
    """Uploads from train replies, in shard order (so sums run in a fixed order)."""
    uploads = []
    for r in _ok(replies):
        m = r.content["metrics"]
        counts = torch.tensor(list(m["group-counts"]), dtype=torch.float64).reshape(layout.layers, layout.n_groups)
        changed = (torch.tensor(list(m["group-changed"]), dtype=torch.float64) if "group-changed" in m else None)
        arrays = record_to_params(r.content["arrays"])
        rows = {n: (arrays.pop(f"{n}@rows"), arrays.pop(f"{n}@weights")) for n in layout.aligned
                if f"{n}@rows" in arrays}
        touched = {n: arrays.pop(f"{n}@touched") for n in layout.shared if f"{n}@touched" in arrays}
        # under DP a client sends no examples / loss-sum (UNNOISED_TRAIN_METRICS): 0 and NaN
        uploads.append(Upload(arrays, float(m["weight"]), counts, int(m["users"]),
                              int(m.get("examples", 0)), float(m.get("loss-sum", float("nan"))),
                              {k: float(m[k]) for k in ("epsilon", "noise-multiplier", "delta")} if "epsilon" in m else None,
                              changed, int(m.get("routed-before", 0)), rows or None, touched or None))
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
        if stage == "test":
            from fedrec.federated.robust import combine_exposure

            out[stage].update(combine_exposure(summaries))  # er@K of the attack's target item
    return out

