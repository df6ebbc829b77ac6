"""fedrec's ServerApp: asks one node for the initial parameters and layout, runs the
role-aware strategy for ``rounds`` rounds (continuing from a checkpoint with ``resume``), and
writes the result JSON to ``out`` (when set).

The server never loads data: shapes and parameter roles come from a client's ``query`` reply.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedrec.federated.checkpoint import load_server
from fedrec.federated.history import RunHistory
from fedrec.federated.node import layout_from_record, params_to_record, record_to_params
from fedrec.federated.privacy import calibrate_noise
from fedrec.federated.spec import RunSpec, parse_run_config
from server.secagg import secure_round
from server.strategy import CentralDPFixedClipping, RoleAwareStrategy

app = ServerApp()


def _wait_for_nodes(grid: Grid, n: int, timeout: float = 600.0) -> list[int]:
    deadline = time.time() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= max(1, n):
            return nodes
        if time.time() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {n} nodes connected after {timeout:.0f} s")
        time.sleep(0.5)


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
                                            clipping_range=spec.secagg_clipping_range)
        record = dict(metrics)
        if counts.numel():
            record["group-counts"] = counts.tolist()
        strategy.history.record_train(rnd, record)
        strategy.group_counts, strategy._latest, params = counts, new, new
        flower_round = rnd - strategy.round_offset  # the strategy adds its offset back
        messages = list(strategy.configure_evaluate(flower_round, params_to_record(new), ConfigRecord({}), grid))
        if messages:
            strategy.aggregate_evaluate(flower_round, grid.send_and_receive(messages))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run a federated training described by the run config (see ``fedrec.federated.spec``)."""
    spec = parse_run_config(context.run_config)
    nodes = _wait_for_nodes(grid, spec.shards)
    replies = list(grid.send_and_receive([Message(RecordDict({}), dst_node_id=nodes[0], message_type="query")]))
    if not replies or replies[0].has_error():
        reason = replies[0].error.reason if replies else "no reply"
        raise RuntimeError(f"could not get the initial parameters from node {nodes[0]}: {reason}")
    init = replies[0].content
    history = RunHistory(spec)
    initial, done, counts = init["arrays"], 0, None
    if spec.resume:  # continue from the last checkpoint (see fedrec.federated.checkpoint)
        saved = load_server(spec.checkpoint_dir)
        initial, done, counts = params_to_record(saved["global"]), int(saved["round"]), saved["group_counts"]
        history.load_state_dict(saved["history"])
    num_nodes = spec.shards or len(nodes)
    central = None
    if spec.central_dp:
        sigma = spec.central_noise_multiplier or calibrate_noise(
            target_epsilon=spec.central_target_epsilon, delta=spec.central_delta, rounds=spec.federated.rounds)
        central = (sigma, spec.central_delta)
    strategy = RoleAwareStrategy(layout=layout_from_record(init["layout"]), history=history,
                                 num_nodes=num_nodes, round_offset=done, group_counts=counts, central=central,
                                 checkpoint=(spec.checkpoint_dir, spec.checkpoint_every) if spec.checkpoint_every else None)
    if central is not None:  # client-level DP with Flower's wrapper (fedrec.federated.privacy)
        strategy = CentralDPFixedClipping(strategy, noise_multiplier=central[0], clipping_norm=spec.central_clipping_norm,
                                          num_sampled_clients=num_nodes)
    if spec.secure_aggregation:
        _run_secure(grid, context, spec, strategy, initial, done)
    elif spec.federated.rounds > done and not history.stopped:
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=spec.federated.rounds - done)
    result = history.result()
    result["nodes"] = spec.shards or len(nodes)
    if spec.out:
        out = Path(spec.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(result, handle, indent=1)
        os.replace(tmp, out)
