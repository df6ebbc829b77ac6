"""The app on Flower's Deployment Runtime: a real SuperLink and SuperNodes on loopback, each
node reading only its own users' file (``--node-config``) with the shared catalogue; the same
over TLS with SuperNode authentication, where an unregistered node is refused; and a node
killed mid-run that rejoins. Every process started here is killed by PID (its own process
group)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import Deployment, flower_env, make_tls_material  # tests/deployment/harness.py (rootdir-relative import)

from fedrec.data import load_dataset
from fedrec.data.federation import load_manifest, write_federation
from fedrec.federated.model import evaluate_federated
from fedrec.federated.runner import find_app_dir, run_in_process
from fedrec.federated.spec import parse_run_config

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

SYNTHETIC = "synthetic:users=24,items=40,seed=2"


def _run_config(out: Path, **extra) -> str:
    spec = parse_run_config({"rounds": 2, "shards": 2, "model.dim": 16, "model.max-len": 20, "out": str(out), **extra})
    items = []
    for k, v in spec.flower_config().items():
        if k == "data":
            continue  # the data path is the nodes' (node config), not the app's
        items.append(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}")
    return " ".join(items)


def _run(dep: Deployment, out: Path, **extra) -> dict:
    done = dep.flwr("run", str(find_app_dir()), "loopback", "--run-config", _run_config(out, **extra), "--stream")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    status = dep.run_status()
    assert status == "finished:completed", (status, done.stdout[-3000:], dep.log("node0")[-3000:])
    return json.loads(out.read_text())


def _wait_online(dep: Deployment, n: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        ls = dep.flwr("supernode", "ls", "loopback", "--format", "json", timeout=60)
        try:
            nodes = json.loads(ls.stdout).get("nodes", [])
        except json.JSONDecodeError:
            nodes = []
        if sum(1 for node in nodes if str(node.get("status", "")).lower() == "online") >= n:
            return
        time.sleep(1)
    raise AssertionError(f"fewer than {n} SuperNodes online: {ls.stdout[-2000:]} {ls.stderr[-2000:]}")


@pytest.mark.realdata
def test_superlink_and_two_supernodes_with_node_local_files(tmp_path, shared_data):
    """Each SuperNode is given only its own users' file and the shared catalogue; the run
    equals the in-process run of the same folder, names what the nodes trained on, and
    leaves a model that `fedrec evaluate` scores to the run's own numbers."""
    fed = tmp_path / "fed"
    write_federation(f"movielens:{shared_data / 'ml-100k' / 'u.data'}", fed, clients=2)
    manifest = load_manifest(fed)
    dep = Deployment(tmp_path)
    model_dir = tmp_path / "model"
    extra = {"model-dir": str(model_dir), "model.max-len": 50, "eval-every": 1}
    try:
        dep.start_superlink()
        for i, entry in enumerate(manifest["clients"]):
            own = entry["data"].replace("parquet:", f"parquet:{fed}/", 1)
            dep.start_supernode(f"node{i}", f'data="{own}" catalogue="{fed / "catalogue.parquet"}" shard={i}')
        result = _run(dep, tmp_path / "result.json", **extra)
        # a bad run config is refused before anything is submitted (exit 2)
        fedrec = str(Path(sys.executable).with_name("fedrec"))
        refused = subprocess.run([fedrec, "launch", "loopback", "--run-config", "rounds=0", "--timeout", "300"],
                                 env=flower_env(dep.cli_home), capture_output=True, text=True, check=False, timeout=400)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stdout + refused.stderr
        assert "'rounds' must be >= 1" in refused.stderr
        # `flwr run --stream` exits 0 on a failed run; `fedrec launch` does not: a third node
        # never connects, the server gives up after 'node-wait' with one line naming it
        failed = subprocess.run([fedrec, "launch", "loopback", "--run-config", "shards=3 node-wait=2", "--timeout", "300",
                                 "--log", str(tmp_path / "failed.log")], env=flower_env(dep.cli_home),
                                capture_output=True, text=True, check=False, timeout=400)
        assert failed.returncode == 1 and "finished:failed" in failed.stderr, failed.stdout + failed.stderr
        assert "only 2 of 3 nodes connected after 2 s (run config 'node-wait')" in failed.stderr
    finally:
        dep.close()
    assert not dep.leftovers()  # nothing left running
    assert result["rounds"] == 2 and result["nodes"] == 2
    assert result["data"].startswith("node-local: parquet:") and "client-0.parquet" in result["data"]
    assert [n["users"] for n in result["node_data"]] == [c["users"] for c in manifest["clients"]]
    assert all(h["train"]["users"] == 943 and h["train"]["clients"] == [0, 1] for h in result["history"])
    local = run_in_process(parse_run_config({"rounds": 2, "model.dim": 16, **extra, "model-dir": "",
                                             "federation": str(fed)}))
    for a, b in zip(result["history"], local["history"], strict=True):
        assert a["valid"] == b["valid"] and a["test"] == b["test"]
    again = evaluate_federated(model_dir)
    assert again["test"] == result["test"] and again["round"] == result["best_round"]


def test_tls_with_supernode_authentication_and_secure_aggregation(tmp_path):
    """TLS + SuperNode authentication: an unregistered key and a node without TLS are
    refused; the two registered nodes train 2 rounds with SecAgg+."""
    tls = make_tls_material(tmp_path / "tls", ["sn0", "sn1", "stranger"])
    fed = tmp_path / "fed"
    write_federation(SYNTHETIC, fed, clients=2)
    dep = Deployment(tmp_path, tls=tls)
    try:
        dep.start_superlink()
        for name in ("sn0", "sn1"):
            reg = dep.flwr("supernode", "register", str(tls[name + ".pub"]), "loopback", timeout=120)
            assert reg.returncode == 0, reg.stdout + reg.stderr
        stranger = dep.start_supernode("stranger", f'data="{SYNTHETIC}" shard=0 shards=2', key=tls["stranger"], retries=2)
        plain = dep.start_supernode("plain", f'data="{SYNTHETIC}" shard=1 shards=2', insecure=True, retries=2)
        for i, name in enumerate(("sn0", "sn1")):  # each reads only its client file of the folder
            dep.start_supernode(f"node{i}", f'federation="{fed}" shard={i}', key=tls[name])
        _wait_online(dep, 2)
        # and the uploads summed under SecAgg+ between real processes
        result = _run(dep, tmp_path / "result.json", **{"secure-aggregation": True})
        # the unregistered key and the node without TLS gave up, refused
        for proc in (stranger, plain):
            proc.wait(timeout=120)
    finally:
        dep.close()
    assert not dep.leftovers()
    # refused: Flower's exit code 305, "could not establish a connection to the SuperLink"
    assert stranger.returncode != 0 and plain.returncode != 0
    assert "Exit Code: 305" in dep.log("stranger") and "Exit Code: 305" in dep.log("plain")
    assert result["rounds"] == 2 and [h["train"]["users"] for h in result["history"]] == [24, 24]
    assert result["config"]["secure-aggregation"] is True and result["data"] == f"federation:{fed}"
    assert 0.0 <= result["test"]["auc"] <= 1.0


def test_a_killed_supernode_costs_its_rounds_not_the_run(tmp_path):
    """3 SuperNodes; node 1 is killed (by PID) during its first round and restarted later:
    the rounds without it finish with the others (min-nodes 2) and name it as failed, the run
    ends finished:completed, and the restarted node restores its private state from its
    checkpoint and takes part again."""
    fed = tmp_path / "fed"
    write_federation(SYNTHETIC, fed, clients=3)
    ck = tmp_path / "ck"
    dep = Deployment(tmp_path)
    rounds = 5
    try:
        dep.start_superlink()
        nodes = [dep.start_supernode(f"node{i}", f'federation="{fed}" shard={i}') for i in range(3)]
        _wait_online(dep, 3)
        out = tmp_path / "result.json"
        config = _run_config(out, shards=3, rounds=rounds, **{"min-nodes": 2, "round-timeout": 240.0,
                                                               "checkpoint-dir": str(ck), "checkpoint-every": 1,
                                                               "eval-every": rounds})
        run = dep.flwr_background("run", str(find_app_dir()), "loopback", "--run-config", config, "--stream")
        _wait_for(lambda: (ck / "client-1-round1.pt").exists(), 300, "node 1's first round")
        dep.kill(nodes[1])
        _wait_for(lambda: (ck / "server.pt").exists() and _server_round(ck) >= 2, 400, "a round without node 1")
        dep.start_supernode("node1-again", f'federation="{fed}" shard=1')
        run.wait(timeout=900)
        status = dep.run_status()
    finally:
        dep.close()
    assert not dep.leftovers()
    assert status == "finished:completed", (status, dep.log("superlink")[-2000:])
    result = json.loads(out.read_text())
    history = {h["round"]: h["train"] for h in result["history"]}
    lost = [r for r, h in history.items() if 1 not in h["clients"]]
    assert lost and all(history[r]["clients"] == [0, 2] for r in lost)
    # asked and never answered (failed), or not connected any more (absent)
    assert all(any(f["client"] == 1 for f in history[r].get("failed", [])) or history[r].get("absent") == [1]
               for r in lost)
    assert any(f["client"] == 1 for r in lost for f in history[r].get("failed", []))
    back = [r for r in history if r > max(lost) and 1 in history[r]["clients"]]
    assert back, history  # the restarted node took part again
    assert history[rounds]["clients"] == [0, 1, 2] and result["test"]["n"] == 24
    # it came back with the private state of its last checkpoint (round 1), not a fresh one
    restored = [x for h in history.values() for x in h.get("restored", [])]
    assert restored and restored[0]["client"] == 1 and restored[0]["round"] >= 1


def _server_round(ck: Path) -> int:
    import torch

    try:
        return int(torch.load(ck / "server.pt", weights_only=False)["round"])
    except Exception:  # being written
        return 0


def _wait_for(check, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_cross_domain_unicdr_with_one_supernode_per_domain(tmp_path):
    """Federated UniCDR on real processes: each SuperNode holds one domain's file only; the
    private set intersection runs through the SuperLink before the first round, and the run
    equals the in-process run of the same folder."""
    data = "synthetic:users=120,items=200,domains=2,overlap=0.5,groups=2,seed=4"
    fed = tmp_path / "fed"
    write_federation(data, fed, clients=2, partition="domain")
    extra = {"task": "cdr", "algorithm": "unicdr", "partition": "domain", "lr": 0.01, "negatives": 4,
             "protocol": "sampled-99", "batch-size": 64, "model.max-len": 5, "model.eval-len": 10}
    dep = Deployment(tmp_path)
    try:
        dep.start_superlink()
        for i in range(2):
            dep.start_supernode(f"node{i}", f'federation="{fed}" shard={i}')
        _wait_online(dep, 2)
        result = _run(dep, tmp_path / "result.json", **extra)
    finally:
        dep.close()
    assert not dep.leftovers()
    frame = load_dataset(data).interactions.frame
    both = set(frame.loc[frame["domain"] == "d0", "user"]) & set(frame.loc[frame["domain"] == "d1", "user"])
    assert result["alignment"]["common_users"] == len(both)
    local = run_in_process(parse_run_config({"rounds": 2, "shards": 2, "model.dim": 16, **extra,
                                             "federation": str(fed)}))
    assert result["history"] == local["history"]
    assert {"d0/hr@10", "d1/hr@10"} <= set(result["test"])
