"""fedrec's ServerApp: asks one node for the initial parameters and layout, runs the
role-aware strategy for ``rounds`` rounds (continuing from a checkpoint with ``resume``), and
writes the result JSON to ``out`` (when set).

An algorithm whose nodes share rows of common users (cross-domain UniCDR) first has the
nodes run a private set intersection through the server (``fedrec.federated.node.align_nodes``).

The server never loads data: shapes and parameter roles come from a client's ``query`` reply
(every node builds the same initial parameters from the shared catalogue; the server checks
that all nodes report the same catalogue). With ``model-dir`` it saves the global
parameters of the best validation round and asks every node to save its private state of
that round.
"""

from __future__ import annotations

import time
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedrec.errors import ConfigError, FedrecError
from fedrec.files import write_json_atomic
from fedrec.federated.checkpoint import load_server, save_global_model
from fedrec.federated.failures import FailurePlan, check_failure_counts
from fedrec.federated.flower_errors import error_reason, install_one_line_errors
from fedrec.federated.history import RunHistory, data_identity
from fedrec.federated.node import align_nodes, layout_from_record, params_to_record, query_nodes, record_to_params
from fedrec.federated.privacy import calibrate_noise, central_delta, check_delta
from fedrec.federated.spec import RunSpec, parse_run_config
from server.secagg import secure_round
from server.strategy import CentralDPFixedClipping, RoleAwareStrategy

app = ServerApp()
install_one_line_errors()  # a FedrecError ends the run as one line in Flower's log, not a traceback


def _wait_for_nodes(grid: Grid, n: int, timeout: float, *, poll: float = 0.5, grace: float = 1.0) -> list[int]:
    """The connected nodes once there are ``n`` (at least one); logs once, after ``grace``
    seconds short of them, how many of how many are connected, and gives up after
    ``timeout`` seconds (run config ``node-wait``) with a one-line error naming the key.

    A node that connects is asked what its node config says of the federation's size
    (``hello``, answered without loading data): a node of a Flower simulation knows it
    (``num-partitions``: the simulation's SuperNodes, all connected at once), so ``shards``
    above it is refused at once instead of waiting for nodes that cannot come."""
    n = max(1, n)
    start = time.monotonic()
    asked: set[int] = set()
    said = False
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            if said:
                log(INFO, "fedrec: all %d nodes connected after %.0f s", len(nodes), time.monotonic() - start)
            return nodes
        waited = time.monotonic() - start
        if not said and waited >= grace:
            log(INFO, "fedrec: waiting for nodes: %d of %d connected (run config 'shards' = %d; giving up after "
                "'node-wait' = %g s)", len(nodes), n, n, timeout)
            said = True
        new = [x for x in nodes if x not in asked]
        if new:
            asked.update(new)
            replies = query_nodes(grid, new, kind="hello", timeout=max(1.0, min(60.0, timeout - waited)))
            for node, info in sorted(replies.items()):
                if "shards" in info and int(info["shards"]) < n:  # a node of a whole dataset, told its size
                    raise ConfigError(f"run config 'shards' is {n}, but node {node}'s node config says "
                                      f"shards={int(info['shards'])}: give both the same number")
                if "shards" not in info and "num-partitions" in info and int(info["num-partitions"]) < n:
                    k = int(info["num-partitions"])
                    raise ConfigError(f"run config 'shards' is {n}, but this Flower simulation has {k} "
                                      f"SuperNode(s): set shards={k}, or run with --federation-config "
                                      f"num-supernodes={n}")
            continue
        if time.monotonic() - start > timeout:
            raise ConfigError(f"only {len(nodes)} of {n} nodes connected after {timeout:g} s (run config "
                              f"'node-wait'): start more SuperNodes, lower 'shards', or raise 'node-wait'")
        time.sleep(poll)


def _run_secure(grid: Grid, context: Context, spec: RunSpec, strategy: RoleAwareStrategy, initial: ArrayRecord,
                done: int) -> None:
    """Rounds ``done + 1 ..`` with the uploads summed under SecAgg+ (``server/secagg.py``);
    evaluation and checkpoints go through the role-aware strategy as usual."""
    params = record_to_params(initial)
    for rnd in range(done + 1, spec.federated.rounds + 1):
        if strategy.history.stopped:
            break
        new, counts, metrics = secure_round(grid, context, layout=strategy.layout, global_params=params, round=rnd,
                                            group_counts=strategy.group_counts, num_nodes=strategy.num_nodes,
                                            clipping_range=spec.secagg_clipping_range,
                                            best_round=strategy.best_round)
        record = dict(metrics)
        if counts.numel():
            record["group-counts"] = counts.tolist()
        strategy.history.record_train(rnd, record)
        strategy.group_counts, strategy._latest, params = counts, new, new
        flower_round = rnd - strategy.round_offset  # the strategy adds its offset back
        messages = list(strategy.configure_evaluate(flower_round, params_to_record(new), ConfigRecord({}), grid))
        if messages:
            strategy.aggregate_evaluate(flower_round, grid.send_and_receive(messages))


def _nodes_data(infos: dict[int, dict]) -> tuple[str, list[dict]]:
    """What the nodes trained on, for the result: a short ``data`` and one entry per node."""
    nodes = [{"node": int(n), **info} for n, info in sorted(infos.items(), key=lambda kv: (kv[1].get("client", -1), kv[0]))]
    modes = {i.get("mode") for i in infos.values()}
    if modes == {"one-dataset"} and len({i.get("data") for i in infos.values()}) == 1:
        return next(iter(infos.values()))["data"], nodes
    feds = {i.get("federation") for i in infos.values()}
    if modes == {"federation"} and len(feds) == 1:
        return f"federation:{feds.pop()}", nodes
    return "node-local: " + ", ".join(str(n.get("data")) for n in nodes), nodes


def _check_nodes(infos: dict[int, dict]) -> None:
    """Every node must share one catalogue (else their item rows would not line up)."""
    prints = {i.get("catalogue-fingerprint") for i in infos.values()}
    if len(prints) > 1:
        detail = ", ".join(f"node {n} (client {i.get('client')}): {i.get('catalogue-fingerprint')}"
                           for n, i in infos.items())
        raise FedrecError(f"the nodes do not share one item catalogue: {detail}")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run a federated training described by the run config (see ``fedrec.federated.spec``)."""
    spec = parse_run_config(context.run_config)
    if spec.central_dp and spec.min_nodes and spec.min_nodes < (spec.shards or 0):
        raise ConfigError("central DP calibrates its noise for all 'shards' nodes: 'min-nodes' must not be below it")
    nodes = _wait_for_nodes(grid, spec.shards, spec.node_wait)
    infos = query_nodes(grid, nodes, kind="info")
    _check_nodes(infos)
    alignment = None
    if any(i.get("align") for i in infos.values()):
        # the algorithm shares rows of users several nodes hold: find them privately first
        alignment = align_nodes(grid, nodes, timeout=spec.round_timeout or None)
    replies = list(grid.send_and_receive([Message(RecordDict({"config": ConfigRecord({"kind": "init"})}),
                                                  dst_node_id=nodes[0], message_type="query")]))
    if not replies or replies[0].has_error():
        reason = error_reason(replies[0].error.reason) if replies else "no reply"
        raise FedrecError(f"could not get the initial parameters from node {nodes[0]}: {reason}")
    init = replies[0].content
    if "info" in init.config_records:
        infos[nodes[0]] = dict(init["info"])
    history = RunHistory(spec)
    history.data = data_identity(infos)  # a resume must be over the same data (checked on load)
    initial, done, counts = init["arrays"], 0, None
    if spec.resume:  # continue from the last checkpoint (see fedrec.federated.checkpoint)
        saved = load_server(spec.checkpoint_dir)
        history.load_state_dict(saved["history"])  # refuses a checkpoint of another run
        fresh = {k: tuple(v.shape) for k, v in record_to_params(init["arrays"]).items()}
        kept = {k: tuple(v.shape) for k, v in saved["global"].items()}
        if fresh != kept:
            first = next((k for k in sorted(set(fresh) | set(kept)) if fresh.get(k) != kept.get(k)), "?")
            raise ConfigError(f"resume: the checkpoint's model has another shape ({first}: {kept.get(first)} there, "
                              f"{fresh.get(first)} here)")
        initial, done, counts = params_to_record(saved["global"]), int(saved["round"]), saved["group_counts"]
    num_nodes = spec.shards or len(nodes)
    central = None
    if spec.central_dp:
        # the unit is a client: delta defaults to min(1e-5, 0.01 / clients), warns above 1 / clients
        if spec.central_delta:
            check_delta(spec.central_delta, num_nodes, key="central-delta", unit="clients")
        delta = spec.central_delta or central_delta(num_nodes)
        sigma = spec.central_noise_multiplier or calibrate_noise(
            target_epsilon=spec.central_target_epsilon, delta=delta, rounds=spec.federated.rounds)
        central = (sigma, delta)
    layout = layout_from_record(init["layout"])
    failures = None
    if spec.client_failure or spec.stragglers:  # simulated failures (fedrec.federated.failures)
        check_failure_counts(client_failure=spec.client_failure, stragglers=spec.stragglers, clients=num_nodes,
                             min_nodes=spec.min_nodes)
        failures = FailurePlan(client_failure=spec.client_failure, stragglers=spec.stragglers,
                               delay=spec.straggler_delay, seed=spec.federated.seed,
                               timeout=spec.round_timeout or 3600.0)
    strategy = RoleAwareStrategy(layout=layout, history=history,
                                 num_nodes=num_nodes, round_offset=done, group_counts=counts, central=central,
                                 checkpoint=(spec.checkpoint_dir, spec.checkpoint_every) if spec.checkpoint_every else None,
                                 min_nodes=spec.min_nodes,
                                 node_clients={n: int(i.get("client", -1)) for n, i in infos.items()},
                                 robust=(spec.robust, spec.robust_fraction, spec.robust_norm),
                                 failures=failures)
    inner = strategy
    if central is not None:  # client-level DP with Flower's wrapper (fedrec.federated.privacy)
        strategy = CentralDPFixedClipping(strategy, noise_multiplier=central[0], clipping_norm=spec.central_clipping_norm,
                                          num_sampled_clients=num_nodes)
    if spec.secure_aggregation:
        _run_secure(grid, context, spec, inner, initial, done)
    elif spec.federated.rounds > done and not history.stopped:
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=spec.federated.rounds - done,
                       timeout=spec.round_timeout or 3600.0)
    result = history.result()
    result["nodes"] = spec.shards or len(nodes)
    result["data"], result["node_data"] = _nodes_data(infos)
    if spec.attack_fraction > 0 or spec.attack_target:
        result["attack"] = _attack_record(spec, infos)
    if alignment is not None:
        result["alignment"] = {"method": "private set intersection (DH, P-256)", "common_users": alignment["common"]}
    if spec.model_dir:
        _save_model(grid, spec, inner, layout)
        result["model_dir"] = spec.model_dir
    if spec.out:
        write_json_atomic(result, spec.out)  # the mode open() would give, not mkstemp's 0600


def _attack_record(spec: RunSpec, infos: dict[int, dict]) -> dict:
    """The attack simulation of the run, for its result: the attack, its malicious clients
    (as the nodes report them), the target item and the defence."""
    targets = sorted({str(i["attack-target"]) for i in infos.values() if "attack-target" in i})
    return {"attack": spec.attack, "fraction": spec.attack_fraction,
            "scale": spec.attack_scale if spec.attack in ("scale", "item-promotion") else None,
            "malicious-clients": sorted(int(i.get("client", -1)) for i in infos.values() if i.get("malicious")),
            "target": targets[0] if len(targets) == 1 else targets,
            "robust": spec.robust, "robust-fraction": spec.robust_fraction, "robust-norm": spec.robust_norm}


def _save_model(grid: Grid, spec: RunSpec, strategy: RoleAwareStrategy, layout) -> None:
    """The run's model: ``global.pt`` here, and each node's private state of the best round
    on its own machine (nodes that already saved it during the run do nothing)."""
    if strategy.best_params is None:
        raise FedrecError("model-dir: no evaluated round to save (the run ended before its first evaluation)")
    save_global_model(spec.model_dir, round=strategy.best_round, global_params=strategy.best_params,
                      group_counts=strategy.best_counts, run_config=spec.to_flat(),
                      layout={"shared": list(layout.shared), "groups": {k: list(v) for k, v in layout.groups.items()}},
                      metrics={"valid": strategy.history.best.get("valid", {}), "test": strategy.history.best.get("test", {})})
    query_nodes(grid, sorted(grid.get_node_ids()), kind="save-model", **{"best-round": strategy.best_round})
