"""Issue 19, item 2: clients that fail or straggle (``client-failure``, ``stragglers``,
``straggler-delay``): the draw, what the round aggregates and the history records, the
balance-loss counts, the in-process grid's simulated timeout, and bad values refused."""

from __future__ import annotations

import time

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from typer.testing import CliRunner

from fedrec.cli import app
from fedrec.errors import ConfigError
from fedrec.federated import failures, runner
from fedrec.federated.failures import FailurePlan, draw_clients, drawn_count
from fedrec.federated.runner import run_in_process
from fedrec.federated.spec import parse_run_config

SPEC = "synthetic:users=36,items=150,seed=3"
TINY = {"rounds": 3, "model.dim": 16, "model.max-len": 20, "eval-every": 1, "data": SPEC}


def test_the_draw_is_an_exact_count_fixed_by_seed_and_round():
    clients = list(range(10))
    for fraction, k in ((0.0, 0), (0.1, 1), (0.3, 3), (0.99, 9)):
        for rnd in range(1, 30):
            got = draw_clients(clients, fraction=fraction, seed=0, round=rnd, kind="failure")
            assert len(got) == k and set(got) <= set(clients) and got == sorted(got)
            assert got == draw_clients(clients, fraction=fraction, seed=0, round=rnd, kind="failure")
    draws = [tuple(draw_clients(clients, fraction=0.3, seed=0, round=r, kind="failure")) for r in range(1, 40)]
    assert len(set(draws)) > 10  # other rounds, other clients
    other_seed = [tuple(draw_clients(clients, fraction=0.3, seed=1, round=r, kind="failure")) for r in range(1, 40)]
    assert draws != other_seed
    # every client fails about equally often over many rounds (3 of 10 per round, 300 draws)
    counts = [sum(c in d for d in (draw_clients(clients, fraction=0.3, seed=0, round=r, kind="failure")
                                   for r in range(1, 1001))) for c in clients]
    assert all(230 <= n <= 370 for n in counts), counts
    assert drawn_count(0.29, 100) == 29 and drawn_count(0.3, 10) == 3 and drawn_count(0.7, 10) == 7


def test_the_draw_follows_client_ids_not_node_ids():
    """Node ids differ between runtimes; the drawn clients do not."""
    plan = FailurePlan(client_failure=0.3, stragglers=0.2, delay=5.0, seed=7, timeout=2.0)
    runner._set_identity(1, 0)  # messages are built as the server (Flower reads the sender's identity)

    def marked(node_ids: list[int]) -> tuple[set[int], set[int]]:
        clients = {n: i for i, n in enumerate(node_ids)}
        content = RecordDict({"config": ConfigRecord({"round": 4})})
        msgs = [Message(content, dst_node_id=n, message_type="train") for n in node_ids]
        out, reasons, slow = plan.mark(msgs, clients, 4)
        fail = {clients[m.metadata.dst_node_id] for m in out if failures.FAILURE_KEY in m.content["config"]}
        late = {clients[m.metadata.dst_node_id] for m in out if failures.DELAY_KEY in m.content["config"]}
        assert {s["client"] for s in slow} == late and len(reasons) == len(fail) + len(late)
        assert failures.FAILURE_KEY not in content["config"]  # the shared content is left alone
        return fail, late

    a = marked(list(range(1, 11)))
    b = marked([9_000_000 + 17 * i for i in range(10)])
    assert a == b and len(a[0]) == 3 and len(a[1]) == 2 and not a[0] & a[1]


def test_the_mod_fails_or_delays_train_replies_only(monkeypatch):
    calls = []
    from fedrec.federated import node

    monkeypatch.setattr(node, "client_skip_round", lambda msg, ctx: calls.append("skip"))

    def call_next(msg, ctx):
        calls.append(msg.metadata.message_type)
        return Message(RecordDict({"config": ConfigRecord({"ok": 1})}), reply_to=msg)

    ctx = Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={})
    failing = Message(RecordDict({"config": ConfigRecord({"round": 1, failures.FAILURE_KEY: "simulated failure (x)"})}),
                      dst_node_id=3, message_type="train")
    runner._set_identity(1, 3)
    try:
        reply = failures.simulated_failure_mod(failing, ctx, call_next)
        assert reply.has_error() and reply.error.reason == "simulated failure (x)" and calls == ["skip"]
        calls.clear()
        late = Message(RecordDict({"config": ConfigRecord({"round": 1, failures.DELAY_KEY: 30.0})}),
                       dst_node_id=3, message_type="train")
        start = time.perf_counter()
        with failures.virtual_clock() as clock:
            reply = failures.simulated_failure_mod(late, ctx, call_next)
        assert not reply.has_error() and clock[0] == 30.0 and time.perf_counter() - start < 5 and calls == ["train"]
        evaluate = Message(RecordDict({"config": ConfigRecord({failures.FAILURE_KEY: "x"})}), dst_node_id=3,
                           message_type="evaluate")
        assert not failures.simulated_failure_mod(evaluate, ctx, call_next).has_error()
    finally:
        runner._set_identity(1, 0)


def _recording(monkeypatch) -> list[tuple[str, int, Message, Message | None]]:
    """Record every (type, round, sent message, reply) the in-process grid delivers."""
    seen: list = []
    real = runner.InProcessGrid.push_messages

    def push(self, messages):
        messages = list(messages)
        ids = list(real(self, messages))
        for msg, i in zip(messages, ids, strict=True):
            cfg = msg.content.config_records.get("config", {})
            seen.append((msg.metadata.message_type, int(cfg.get("round", 0)), msg, self._replies.get(i)))
        return ids

    monkeypatch.setattr(runner.InProcessGrid, "push_messages", push)
    return seen


def test_failing_clients_cost_their_upload_not_their_evaluation(monkeypatch):
    """5 clients, client-failure 0.4: each round exactly 2 clients (the draw) reply with an
    error; the round aggregates the other 3 (min-nodes 0 needs only them), the history
    names the failed ones; every client is evaluated; the group counts of a round are the
    sum over the uploads that arrived and are what the clients get next round."""
    seen = _recording(monkeypatch)
    result = run_in_process(parse_run_config({**TINY, "shards": 5, "client-failure": 0.4}))
    plan = FailurePlan(client_failure=0.4, seed=0)
    rounds = {h["round"]: h for h in result["history"]}
    assert sorted(rounds) == [1, 2, 3]
    for rnd, h in rounds.items():
        failing, _ = plan.draw(list(range(5)), rnd)
        train = h["train"]
        assert len(failing) == 2 and train["clients"] == sorted(set(range(5)) - set(failing))
        assert sorted(f["client"] for f in train["failed"]) == failing
        assert all(f["reason"] == "simulated failure (client-failure 0.4)" for f in train["failed"])
        assert h["evaluate"]["clients"] == [0, 1, 2, 3, 4] and "failed" not in h["evaluate"]
        # the uploads that arrived: their users and group counts are the round's
        arrived = [rep for kind, r, _, rep in seen if kind == "train" and r == rnd and not rep.has_error()]
        assert len(arrived) == 3
        m = [rep.content["metrics"] for rep in arrived]
        assert train["users"] == sum(x["users"] for x in m)
        layers = len(train["group-counts"])
        summed = [sum(x["group-counts"][i] for x in m) for i in range(len(m[0]["group-counts"]))]
        assert [c for row in train["group-counts"] for c in row] == summed
        assert all(sum(row) == train["users"] for row in train["group-counts"]) and layers >= 1
        # ... and the counts the clients are sent for the next round (evaluation and training)
        nxt = [msg for kind, r, msg, _ in seen if r == rnd + 1 and kind == "train"]
        for msg in nxt + [msg for kind, r, msg, _ in seen if kind == "evaluate" and r == rnd]:
            assert list(msg.content["config"]["group-counts"]) == summed
    assert result["test"]["n"] == 36 and result["valid"]["n"] == 36  # every user evaluated
    # the same run again: the same clients fail, the same numbers
    again = run_in_process(parse_run_config({**TINY, "shards": 5, "client-failure": 0.4}))
    assert again["history"] == result["history"] and again["test"] == result["test"]


def test_a_straggler_beyond_the_timeout_is_dropped_without_sleeping(monkeypatch):
    """stragglers 0.2 of 5 clients, 600 s late against a 60 s round-timeout: the in-process
    grid drops each round's straggler (simulated time, no sleep); its state still moved on
    (it trained), every client is evaluated. Under the timeout, the straggler is on time."""
    seen = _recording(monkeypatch)
    start = time.perf_counter()
    late = run_in_process(parse_run_config({**TINY, "shards": 5, "stragglers": 0.2, "straggler-delay": 600,
                                            "round-timeout": 60}))
    assert time.perf_counter() - start < 120
    plan = FailurePlan(stragglers=0.2, delay=600, seed=0)
    for h in late["history"]:
        _, slow = plan.draw(list(range(5)), h["round"])
        assert len(slow) == 1 and h["train"]["stragglers"] == [{"client": slow[0], "delay": 600.0}]
        assert h["train"]["clients"] == sorted(set(range(5)) - set(slow))
        assert [(f["client"], f["reason"]) for f in h["train"]["failed"]] == [
            (slow[0], "straggler: no reply before round-timeout 60 s (simulated delay 600 s)")]
        assert h["evaluate"]["clients"] == [0, 1, 2, 3, 4]
        # the straggler did train: its reply exists, only it came too late
        replies = [rep for kind, r, msg, rep in seen if kind == "train" and r == h["round"]]
        assert len(replies) == 5 and not any(rep.has_error() for rep in replies)
    assert late["test"]["n"] == 36
    on_time = run_in_process(parse_run_config({**TINY, "shards": 5, "stragglers": 0.2, "straggler-delay": 30,
                                               "round-timeout": 60}))
    assert all(h["train"]["clients"] == [0, 1, 2, 3, 4] and "failed" not in h["train"] for h in on_time["history"])
    assert all(len(h["train"]["stragglers"]) == 1 for h in on_time["history"])
    plain = run_in_process(parse_run_config({**TINY, "shards": 5}))
    assert on_time["test"] == plain["test"]  # a straggler on time changes nothing but the wait


def test_resume_under_failures_is_exact(tmp_path):
    """Kill after round 2 (a checkpoint round in which a client fails) and resume: the same
    history and test metrics as the uninterrupted run (the failed client checkpointed its
    unchanged state as round 2's)."""
    flat = {**TINY, "rounds": 4, "shards": 4, "client-failure": 0.25, "checkpoint-every": 2}
    plain = run_in_process(parse_run_config({**flat, "checkpoint-dir": str(tmp_path / "a")}))
    assert plain["history"][1]["train"]["failed"]  # round 2 has its failed client
    ck = str(tmp_path / "b")
    run_in_process(parse_run_config({**flat, "rounds": 2, "checkpoint-dir": ck}))
    resumed = run_in_process(parse_run_config({**flat, "checkpoint-dir": ck, "resume": True}))
    restored = [x for h in resumed["history"] for x in h["train"].pop("restored", [])]
    assert {x["client"] for x in restored} == {0, 1, 2, 3}  # a client failing in round 3 says so in round 4
    assert resumed["history"] == plain["history"] and resumed["test"] == plain["test"]
    with pytest.raises(ConfigError, match="client-failure"):  # another failure rate: another run
        run_in_process(parse_run_config({**flat, "client-failure": 0.5, "checkpoint-dir": ck, "resume": True}))


def test_min_nodes_under_failures():
    """An explicit min-nodes is kept: reachable is accepted, one more than the clients that
    reply is refused up front; 0 means the clients not drawn."""
    ok = run_in_process(parse_run_config({**TINY, "rounds": 1, "shards": 4, "client-failure": 0.25, "min-nodes": 3}))
    assert len(ok["history"][0]["train"]["clients"]) == 3
    with pytest.raises(ConfigError, match="'min-nodes' 4 is more than the 3 of 4"):
        parse_run_config({**TINY, "shards": 4, "client-failure": 0.25, "min-nodes": 4})


BAD = [
    ({"client-failure": 1}, "'client-failure' must be a fraction in [0, 1) (got 1.0)"),
    ({"client-failure": -0.1}, "'client-failure' must be a fraction in [0, 1) (got -0.1)"),
    ({"client-failure": 1.5}, "'client-failure' must be a fraction in [0, 1)"),
    ({"client-failure": float("nan")}, "'client-failure' must be a finite number"),
    ({"client-failure": "inf"}, "'client-failure' must be a finite number"),
    ({"client-failure": "often"}, "'client-failure' must be of type float"),
    ({"stragglers": 1.0, "straggler-delay": 5}, "'stragglers' must be a fraction in [0, 1)"),
    ({"stragglers": 0.2}, "'stragglers' needs 'straggler-delay' > 0"),
    ({"straggler-delay": 5}, "'straggler-delay' is given but 'stragglers' is 0"),
    ({"stragglers": 0.2, "straggler-delay": -1}, "'straggler-delay' must be >= 0"),
    ({"client-failure": 0.1, "shards": 3}, "'client-failure' 0.1 of 3 client(s) draws floor(0.3) = 0 clients"),
    ({"client-failure": 0.5, "stragglers": 0.5, "straggler-delay": 1, "shards": 4}, "no client would reply"),
    ({"client-failure": 0.5, "shards": 4, "secure-aggregation": True}, "cannot be combined with 'secure-aggregation'"),
    ({"client-failure": 0.5, "shards": 4, "central-dp": True, "central-noise-multiplier": 1.0},
     "cannot be combined with 'central-dp'"),
]


@pytest.mark.parametrize("options,message", BAD, ids=[m for _, m in BAD])
def test_bad_failure_options_are_refused_up_front(options, message):
    with pytest.raises(ConfigError) as info:
        parse_run_config({**TINY, "shards": 4, **options})
    text = str(info.value)
    assert message in text and "\n" not in text, text


@pytest.mark.parametrize("value", ["1", "-0.1", "nan"])
def test_bad_client_failure_through_the_cli_is_one_line(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["simulate", "--data", SPEC, "--clients", "4", "--rounds", "1",
                                      "--set", f"client-failure={value}", "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedrec: error: ") and "client-failure" in lines[0], result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "r.json").exists()


def test_the_flower_app_declares_the_failure_options():
    """`flwr run --run-config` accepts only keys declared in pyproject.toml: the three are
    there, with the run spec's defaults."""
    from fedrec.config import load_toml
    from fedrec.federated.runner import find_app_dir

    declared = load_toml(find_app_dir() / "pyproject.toml")["tool"]["flwr"]["app"]["config"]
    spec = parse_run_config({})
    for key in ("client-failure", "stragglers", "straggler-delay"):
        assert declared[key] == spec.to_flat()[key] == 0.0
    assert parse_run_config(declared).to_flat()["client-failure"] == 0.0
