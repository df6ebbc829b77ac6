"""A real federation: federation folders, node-local splits on a shared catalogue, the
equality of a run over a folder with the one-dataset simulation, saved federated models,
recommendations from them, and rounds that lose a node."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from fedrec.data import load_dataset
from fedrec.data.catalogue import Catalogue
from fedrec.data.federation import load_manifest, write_federation
from fedrec.data.split import split_dataset
from fedrec.errors import ConfigError, DataError
from fedrec.federated.model import evaluate_federated, load_federated_model
from fedrec.federated.nodedata import node_data
from fedrec.federated.runner import run_in_process
from fedrec.federated.spec import parse_run_config
from fedrec.recommend import centralised_scorer, recommend

SPEC = "synthetic:users=36,items=150,seed=3"  # enough items for sampled-99's distinct negatives
TINY = {"rounds": 2, "model.dim": 16, "model.max-len": 20, "eval-every": 1}


def _max_diff(a: dict, b: dict) -> float:
    keys = [k for k in a if isinstance(a[k], (int, float)) and a[k] is not None]
    return max((abs(a[k] - b[k]) for k in keys), default=0.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("fed") / "three"
    write_federation(SPEC, out, clients=3, seed=4)
    return out


def test_partition_writes_catalogue_disjoint_client_files_and_manifest(folder):
    manifest = load_manifest(folder)
    whole = split_dataset(load_dataset(SPEC))
    assert manifest["population"] == whole.n_users and manifest["items"] == whole.n_items
    assert manifest["defaults"]["task"] == "ctr" and manifest["partition"] == {"scheme": "iid", "clients": 3, "seed": 4}
    users = []
    for entry in manifest["clients"]:
        frame = pd.read_parquet(folder / entry["file"])
        assert list(frame.columns[:3]) == ["user", "item", "time"] and len(frame) == entry["rows"]
        assert frame["user"].nunique() == entry["users"]
        users.append(set(frame["user"]))
        # readable by the existing parquet source, canonical names need no mapping
        ds = load_dataset(f"parquet:{folder / entry['file']}")
        assert len(ds.interactions) == entry["rows"]
    assert not (users[0] & users[1]) and not (users[0] & users[2]) and not (users[1] & users[2])
    assert set().union(*users) == set(whole.user_raw[1:])
    cat = Catalogue.load(folder / "catalogue.parquet")
    assert np.array_equal(cat.item_raw, whole.item_raw[1:]) and np.array_equal(cat.item_features, whole.item_features[1:])
    assert cat.fingerprint() == manifest["catalogue_fingerprint"]


def test_partition_refuses_a_non_empty_folder_and_leaves_it_alone(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConfigError, match="exists and is not an empty folder"):
        write_federation(SPEC, out, clients=2)
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1
    with pytest.raises(ConfigError, match="larger than the number of users"):
        write_federation(SPEC, tmp_path / "new", clients=10_000)
    assert not (tmp_path / "new").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".new")]


def test_cli_partition_and_describe_a_client_file(tmp_path):
    out = tmp_path / "fed"
    done = subprocess.run([sys.executable, "-m", "fedrec.cli", "data", "partition", SPEC, "--clients", "2",
                           "--out", str(out), "--json"], capture_output=True, text=True, check=True)
    manifest = json.loads(done.stdout)
    assert len(manifest["clients"]) == 2
    described = subprocess.run([sys.executable, "-m", "fedrec.cli", "data", "describe",
                                f"parquet:{out / 'client-1.parquet'}", "--json"], capture_output=True, text=True,
                               check=True)
    assert json.loads(described.stdout)["users"] == manifest["clients"][1]["users"]
    folder = subprocess.run([sys.executable, "-m", "fedrec.cli", "data", "describe", str(out), "--json"],
                            capture_output=True, text=True, check=True)
    per_client = json.loads(folder.stdout)["clients"]
    assert [c["users"] for c in per_client] == [c["users"] for c in manifest["clients"]]
    assert per_client[0]["user_features"]  # read with the client's own user-feature file
    bad = subprocess.run([sys.executable, "-m", "fedrec.cli", "data", "partition", SPEC, "--clients", "2",
                          "--out", str(out)], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "not an empty folder" in bad.stderr and "Traceback" not in bad.stderr


def test_a_node_knows_only_its_users_and_indexes_items_by_the_catalogue(folder):
    whole = split_dataset(load_dataset(SPEC))
    spec = parse_run_config({"federation": str(folder)})
    nd = node_data(spec, {"shard": 1})
    local = nd.split
    manifest = load_manifest(folder)
    assert local.n_users == manifest["clients"][1]["users"] < whole.n_users
    assert local.n_items == whole.n_items and np.array_equal(local.item_raw, whole.item_raw)
    # the same raw item has the same index everywhere; users are numbered 1..n locally
    rows = local.item[local.part == 0][:20]
    assert np.array_equal(local.item_raw[rows], whole.item_raw[rows])
    assert nd.population == whole.n_users and nd.info["out-of-catalogue"] == 0
    # the same node started with its own file and the catalogue: the same split
    own = f"parquet:{folder / 'client-1.parquet'}?user_features=client-1.users.parquet"
    explicit = node_data(parse_run_config({}), {"data": own, "catalogue": str(folder / "catalogue.parquet"),
                                                "shard": 1})
    assert np.array_equal(explicit.split.item, local.item) and np.array_equal(explicit.split.user_raw, local.user_raw)
    assert explicit.population == 0  # a lone node cannot count the federation's users
    # the catalogue is the model's schema: a node without the user features it declares stops
    with pytest.raises(DataError, match="declares user features"):
        node_data(parse_run_config({}), {"data": f"parquet:{folder / 'client-1.parquet'}",
                                         "catalogue": str(folder / "catalogue.parquet")})


def test_out_of_catalogue_items_are_dropped_and_counted(folder, tmp_path):
    frame = pd.read_parquet(folder / "client-0.parquet")
    extra = frame.iloc[:3].copy()
    extra["item"] = [10_001, 10_002, 10_001]
    pd.concat([frame, extra]).to_parquet(tmp_path / "c0.parquet", index=False)
    users = folder / "client-0.users.parquet"
    nd = node_data(parse_run_config({}), {"data": f"parquet:{tmp_path / 'c0.parquet'}?user_features={users}",
                                          "catalogue": str(folder / "catalogue.parquet")})
    assert nd.info["out-of-catalogue"] == 3 and nd.split.out_of_catalogue == 3
    assert len(nd.split.item) == len(frame)


def test_bad_catalogue_and_federation_are_one_line_errors(tmp_path, folder):
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot read the catalogue"):
        Catalogue.load(tmp_path / "x.parquet")
    pd.DataFrame({"item": [1, 2]}).to_parquet(tmp_path / "plain.parquet")
    with pytest.raises(DataError, match="not a fedrec catalogue"):
        Catalogue.load(tmp_path / "plain.parquet")
    with pytest.raises(DataError, match="not a federation folder"):
        load_manifest(tmp_path)
    with pytest.raises(ConfigError, match="no client 7"):
        node_data(parse_run_config({"federation": str(folder)}), {"shard": 7})


@pytest.mark.parametrize("extra", [{}, {"task": "next_item", "protocol": "sampled-99", "algorithm": "fedavg"}],
                         ids=["ctr-mrff", "next-item-fedavg"])
def test_run_over_the_folder_equals_the_one_dataset_simulation(folder, extra):
    """The acceptance equality: same history and test metrics (dropout on: its draws are a
    function of the shard's own users, so they agree too)."""
    a = run_in_process(parse_run_config({**TINY, **extra, "federation": str(folder)}))
    b = run_in_process(parse_run_config({**TINY, **extra, "data": SPEC, "shards": 3, "partition-seed": 4}))
    assert a["nodes"] == b["nodes"] == 3 and a["data"] == f"federation:{folder}" and b["data"] == SPEC
    assert _max_diff(a["test"], b["test"]) <= 1e-6
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert _max_diff(ha["valid"], hb["valid"]) <= 1e-6 and _max_diff(ha["train"], hb["train"]) <= 1e-6
        assert ha["train"]["clients"] == [0, 1, 2]
    assert [n["client"] for n in a["node_data"]] == [0, 1, 2]
    assert all(n["mode"] == "federation" for n in a["node_data"])


def test_a_saved_federated_model_repeats_the_runs_numbers(tmp_path):
    """The best round here is 2 of 6 (lr 2.0 overshoots), so the clients save their state
    during the run (in the train message of round 3), not at its end."""
    run = run_in_process(parse_run_config({**TINY, "data": "synthetic:users=60,items=50,seed=2", "shards": 3,
                                           "rounds": 6, "lr": 2.0, "model-dir": str(tmp_path / "model")}))
    assert run["best_round"] < 6
    again = evaluate_federated(tmp_path / "model")
    assert again["round"] == run["best_round"] and again["clients"] == [0, 1, 2]
    assert again["test"] == run["test"] and again["valid"] == run["valid"]
    # one client's view: only its users
    one = evaluate_federated(tmp_path / "model", clients=[tmp_path / "model" / "client-1.pt"])
    assert 0 < one["test"]["n"] < run["test"]["n"]
    cli = subprocess.run([sys.executable, "-m", "fedrec.cli", "evaluate", str(tmp_path / "model"), "--json"],
                         capture_output=True, text=True, check=True)
    assert json.loads(cli.stdout)["test"] == run["test"]


@pytest.mark.parametrize("extra", [{}, {"task": "next_item", "model.dropout": 0.0}, {"algorithm": "local"}],
                         ids=["ctr", "next-item", "ctr-private-head"])
def test_recommend_from_a_federated_model(tmp_path, extra):
    model_dir = tmp_path / "model"
    run_in_process(parse_run_config({**TINY, **extra, "data": SPEC, "shards": 2, "model-dir": str(model_dir)}))
    _, models = load_federated_model(model_dir)
    m = models[0]
    table = recommend(m.split, m.scorer(), k=5)
    assert (table.groupby("user").size() == 5).all() and table["user"].nunique() == m.split.n_users
    seen = m.split.seen_pairs()
    users = np.searchsorted(m.split.user_raw[1:], table["user"].to_numpy()) + 1
    items = np.searchsorted(m.split.item_raw[1:], table["item"].to_numpy()) + 1
    assert np.array_equal(m.split.user_raw[users], table["user"]) and np.array_equal(m.split.item_raw[items], table["item"])
    assert not np.isin(users * (m.split.n_items + 1) + items, seen).any()
    # the vectorised per-user scores equal an ordinary model holding that user's parameters
    alg = m.node.alg
    u = 2
    plain = copy.deepcopy(alg.model)
    named = dict(plain.named_parameters())
    pos = int(np.searchsorted(m.state.users, u))
    with torch.no_grad():
        for n in alg.layout.global_names:
            named[n].copy_(m.global_params[n])
        for n in alg.layout.per_user:
            named[n][u] = m.state.tensors[n][pos]
        for n in alg.layout.private:
            named[n].copy_(m.state.tensors[n][pos])
    expected = centralised_scorer(plain, m.split, alg.task, alg.max_len)(np.array([u]))
    got = alg.score_items(m.global_params, m.state, np.array([u]))
    assert torch.allclose(got, expected, atol=1e-5)
    out = tmp_path / "rec.jsonl"
    cli = subprocess.run([sys.executable, "-m", "fedrec.cli", "recommend", str(model_dir), "--k", "3", "--out", str(out)],
                         capture_output=True, text=True, check=False)
    assert cli.returncode == 0, cli.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 * sum(mm.split.n_users for mm in models) and set(rows[0]) == {"user", "rank", "item", "score"}


def test_a_lost_node_costs_its_reply_not_the_run(monkeypatch):
    """A node whose train reply is an error in round 2: the round goes on with the others
    (min-nodes 2), the history names the failed node; with min-nodes 3 the run stops."""
    from flwr.app import Error, Message

    from fedrec.federated import runner

    real = runner.InProcessGrid.push_messages

    def flaky(self, messages):
        messages = list(messages)
        keep, lost = [], []
        for msg in messages:
            rnd = msg.content.config_records.get("config", {}).get("round") if msg.content.config_records else None
            if msg.metadata.message_type == "train" and rnd == 2 and msg.metadata.dst_node_id == 2:
                lost.append(msg)
            else:
                keep.append(msg)
        ids = list(real(self, keep))
        for msg in lost:
            reply = Message(Error(code=1, reason="node went away"), reply_to=msg)
            msg_id = f"lost-{msg.metadata.dst_node_id}"
            reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
            self._replies[msg_id] = reply
            ids.append(msg_id)
        return ids

    monkeypatch.setattr(runner.InProcessGrid, "push_messages", flaky)
    base = {**TINY, "data": SPEC, "shards": 3, "rounds": 3}
    result = run_in_process(parse_run_config({**base, "min-nodes": 2}))
    rounds = {h["round"]: h for h in result["history"]}
    assert rounds[1]["train"]["clients"] == [0, 1, 2] and "failed" not in rounds[1]["train"]
    assert rounds[2]["train"]["clients"] == [0, 2]
    assert rounds[2]["train"]["failed"][0]["client"] == 1 and "went away" in rounds[2]["train"]["failed"][0]["reason"]
    assert rounds[3]["train"]["clients"] == [0, 1, 2] and result["test"]["n"] == 36
    with pytest.raises(Exception, match="fewer than min-nodes 3"):
        run_in_process(parse_run_config(base))
