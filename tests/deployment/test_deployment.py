"""The app on Flower's Deployment Runtime: a real SuperLink and SuperNodes on loopback, the
data path coming from each node's ``--node-config``; then the same over TLS with SuperNode
authentication, where an unregistered node is refused. Every process started here is killed
by PID (its own process group)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from harness import Deployment, make_tls_material  # tests/deployment/harness.py (rootdir-relative import)

from fedrec.federated.runner import find_app_dir
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
def test_superlink_and_two_supernodes_run_mrff(tmp_path, shared_data):
    dep = Deployment(tmp_path)
    data = f"movielens:{shared_data / 'ml-100k' / 'u.data'}"
    try:
        dep.start_superlink()
        for i in range(2):
            dep.start_supernode(f"node{i}", f'data="{data}" shard={i} shards=2')
        result = _run(dep, tmp_path / "result.json")
    finally:
        dep.close()
    assert not dep.leftovers()  # nothing left running
    assert result["rounds"] == 2 and result["nodes"] == 2 and result["data"] == "synthetic:"  # run config's default
    assert [h["round"] for h in result["history"]] == [1, 2]
    assert all(h["train"]["users"] == 943 for h in result["history"])  # ML-100K's users, from the nodes' data
    assert result["test"]["n"] == 943 and 0.5 < result["test"]["auc"] < 1.0


def test_tls_with_supernode_authentication_and_secure_aggregation(tmp_path):
    """TLS + SuperNode authentication: an unregistered key and a node without TLS are
    refused; the two registered nodes train 2 rounds with SecAgg+."""
    tls = make_tls_material(tmp_path / "tls", ["sn0", "sn1", "stranger"])
    dep = Deployment(tmp_path, tls=tls)
    try:
        dep.start_superlink()
        for name in ("sn0", "sn1"):
            reg = dep.flwr("supernode", "register", str(tls[name + ".pub"]), "loopback", timeout=120)
            assert reg.returncode == 0, reg.stdout + reg.stderr
        stranger = dep.start_supernode("stranger", f'data="{SYNTHETIC}" shard=0 shards=2', key=tls["stranger"], retries=2)
        plain = dep.start_supernode("plain", f'data="{SYNTHETIC}" shard=1 shards=2', insecure=True, retries=2)
        for i, name in enumerate(("sn0", "sn1")):
            dep.start_supernode(f"node{i}", f'data="{SYNTHETIC}" shard={i} shards=2', key=tls[name])
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
    assert result["config"]["secure-aggregation"] is True
    assert 0.0 <= result["test"]["auc"] <= 1.0
