"""Bad input inside Flower's runtimes (issue 19, item 1): the server's wait for nodes says
what it waits for and ends in one line naming ``node-wait``; a simulation with fewer
SuperNodes than ``shards`` is refused at once; a FedrecError reaches Flower's log as one
line (ServerApp and ClientApp), a node's error reply carries its one-line message, and the
node's state is left as it was. Driven through the in-process Grid (no Ray: seconds)."""

from __future__ import annotations

import logging
import sys
import time

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedrec.errors import ConfigError, DataError, FedrecError
from fedrec.federated.flower_errors import (OneLineFedrecErrors, error_reason, fedrec_errors_mod,
                                            install_one_line_errors)
from fedrec.federated.runner import InProcessGrid, find_app_dir, load_components
from fedrec.federated.spec import parse_run_config

_, CLIENT_APP, _ = load_components(find_app_dir())
SERVER = sys.modules["server.app"]


def _grid(node_configs: list[dict], shards: int) -> InProcessGrid:
    flat = {**parse_run_config({"shards": shards, "data": "synthetic:users=30,items=20"}).to_flat()}
    contexts = {i + 1: Context(run_id=1, node_id=i + 1, node_config=dict(c), state=RecordDict(), run_config=dict(flat))
                for i, c in enumerate(node_configs)}
    from fedrec.federated.runner import _set_identity

    _set_identity(1, 0)  # the server's identity, as the runner sets it
    return InProcessGrid(CLIENT_APP, contexts, run_id=1)


@pytest.fixture()
def flwr_log(caplog):
    """Flower's log records at INFO and above."""
    caplog.set_level(logging.INFO, logger="flwr")
    return caplog


def test_a_simulation_with_fewer_supernodes_than_shards_is_refused_at_once():
    grid = _grid([{"partition-id": 0, "num-partitions": 2}, {"partition-id": 1, "num-partitions": 2}], shards=3)
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        SERVER._wait_for_nodes(grid, 3, timeout=300.0)
    assert time.monotonic() - start < 10  # not the 300 s of node-wait
    assert str(err.value) == ("run config 'shards' is 3, but this Flower simulation has 2 SuperNode(s): set shards=2, "
                              "or run with --federation-config num-supernodes=3")


def test_a_node_told_fewer_shards_than_the_run_is_refused_at_once():
    grid = _grid([{"data": "synthetic:users=30,items=20", "shard": 0, "shards": 2}], shards=3)
    with pytest.raises(ConfigError, match=r"'shards' is 3, but node 1's node config says shards=2"):
        SERVER._wait_for_nodes(grid, 3, timeout=300.0)


def test_waiting_for_nodes_says_so_once_and_ends_naming_node_wait(flwr_log):
    grid = _grid([{"shard": 0}], shards=3)  # a deployment node: it knows nothing of the federation's size
    with pytest.raises(ConfigError) as err:
        SERVER._wait_for_nodes(grid, 3, timeout=1.5, poll=0.1, grace=0.2)
    assert str(err.value) == ("only 1 of 3 nodes connected after 1.5 s (run config 'node-wait'): start more "
                              "SuperNodes, lower 'shards', or raise 'node-wait'")
    said = [r.getMessage() for r in flwr_log.records if "waiting for nodes" in r.getMessage()]
    assert said == ["fedrec: waiting for nodes: 1 of 3 connected (run config 'shards' = 3; giving up after "
                    "'node-wait' = 1.5 s)"]


def test_enough_nodes_start_at_once_without_a_word(flwr_log):
    grid = _grid([{"partition-id": i, "num-partitions": 2} for i in range(2)], shards=2)
    assert SERVER._wait_for_nodes(grid, 2, timeout=300.0) == [1, 2]
    assert not [r for r in flwr_log.records if "nodes" in r.getMessage()]


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "soon"])
def test_node_wait_must_be_a_positive_finite_number(value):
    with pytest.raises(ConfigError, match="node-wait"):
        parse_run_config({"node-wait": value})


def test_node_wait_is_declared_in_the_app_and_free_on_resume():
    from fedrec.federated.history import _RESUME_FREE

    _, _, defaults = load_components(find_app_dir())
    assert defaults["node-wait"] == parse_run_config({}).node_wait == 300.0
    assert "node-wait" in _RESUME_FREE


def test_a_fedrec_error_is_logged_as_one_line_other_errors_keep_their_traceback():
    logger = logging.getLogger("test-one-line")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    logger.addHandler(Keep())
    install_one_line_errors(logger)
    install_one_line_errors(logger)  # once only
    assert sum(isinstance(f, OneLineFedrecErrors) for f in logger.filters) == 1
    for exc in (ConfigError("run config 'task' must be ctr (got 'x')"), ZeroDivisionError("division by zero")):
        try:
            raise exc
        except Exception as caught:  # noqa: BLE001 - the point of the test
            logger.error("%s raised an exception", "ServerApp", exc_info=caught)
    assert records[0] == "ServerApp raised an exception: fedrec: error: run config 'task' must be ctr (got 'x')"
    assert "Traceback" in records[1] and "ZeroDivisionError" in records[1]


def test_flowers_own_logger_carries_the_filter():
    assert any(isinstance(f, OneLineFedrecErrors) for f in logging.getLogger("flwr").filters)


def _message() -> Message:
    from fedrec.federated.runner import _set_identity

    _set_identity(1, 0)
    msg = Message(RecordDict({"config": ConfigRecord({"kind": "info"})}), dst_node_id=7, message_type="query")
    msg.metadata.__dict__["_message_id"] = "m1"
    return msg


def test_the_client_mod_turns_a_fedrec_error_into_one_error_reply_and_keeps_the_state(flwr_log):
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict({"kept": ConfigRecord({"a": 1})}),
                      run_config={})

    def handler(msg, ctx):
        ctx.state["kept"] = ConfigRecord({"a": 2})
        ctx.state["new"] = ConfigRecord({"b": 1})
        raise DataError("file not found", file="/data/client-1.parquet")

    reply = fedrec_errors_mod(_message(), context, handler)
    assert reply.has_error() and reply.error.reason == "/data/client-1.parquet: file not found"
    assert dict(context.state["kept"]) == {"a": 1} and "new" not in context.state
    lines = [r.getMessage() for r in flwr_log.records if "fedrec: error" in r.getMessage()]
    assert lines == ["fedrec: error: /data/client-1.parquet: file not found (query message, node 7)"]


def test_the_client_mod_lets_other_errors_through():
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})

    def handler(msg, ctx):
        raise KeyError("bug")

    with pytest.raises(KeyError):
        fedrec_errors_mod(_message(), context, handler)


def test_in_process_a_nodes_fedrec_error_is_raised_as_it_is(tmp_path):
    """``fedrec simulate`` (the in-process runner) prints the node's own message."""
    from fedrec.federated.runner import run_in_process

    missing = tmp_path / "missing.txt"
    with pytest.raises(FedrecError) as err:
        run_in_process(parse_run_config({"data": f"seq:{missing}", "task": "next_item", "shards": 2, "rounds": 1}))
    assert str(err.value) == f"{missing}: file not found"  # not wrapped in the server's "could not get ..."


@pytest.mark.parametrize("reason, text", [
    ("<class 'fedrec.errors.ConfigError'>:<'node config: shard 3 is not in 0..1'>", "node config: shard 3 is not in 0..1"),
    ("<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ClientAppException occurred. "
     "Message: /x.txt: file not found'>", "/x.txt: file not found"),
    ("no reply before the round's timeout", "no reply before the round's timeout"),
])
def test_error_reason_unwraps_flowers_formats(reason, text):
    assert error_reason(reason) == text
