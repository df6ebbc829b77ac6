"""End to end on Flower's simulation engine: ``flwr run .`` (Ray, a local SuperLink), its
nodes reading a federation folder, gives the same result as the in-process runner for the
same seed — also when clients fail (``client-failure``: the drawn client's error reply
travels through Ray, the round aggregates the other)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedrec.data.federation import write_federation
from fedrec.federated.runner import find_app_dir, run_in_process
from fedrec.federated.spec import parse_run_config

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def _kill_tree(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _pids_of(needle: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", "--", needle], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


CASES = {
    # one of the two clients fails each round (drawn from seed and round, as in process)
    "mrff": ("synthetic:users=24,items=40,seed=2", "iid",
             {"rounds": 2, "shards": 2, "model.dim": 16, "model.max-len": 20, "client-failure": 0.5}),
    # cross-domain: one SuperNode per domain, the private set intersection through the SuperLink
    "unicdr": ("synthetic:users=120,items=200,domains=2,overlap=0.5,groups=2,seed=4", "domain",
               {"rounds": 2, "shards": 2, "task": "cdr", "algorithm": "unicdr", "partition": "domain", "lr": 0.01,
                "negatives": 4, "protocol": "sampled-99", "batch-size": 64, "model.dim": 8, "model.max-len": 5,
                "model.eval-len": 10}),
}


def _flower_env(tmp_path: Path) -> tuple[Path, str, dict[str, str]]:
    """A fresh ``FLWR_HOME`` under ``tmp_path``, this venv's bin folder, and the environment
    ``flwr run`` gets: no runtime installs, no telemetry, free local SuperLink ports."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
           "RAY_DEDUP_LOGS": "0"}
    return home, bin_dir, env


@pytest.mark.parametrize("case", list(CASES))
def test_flwr_run_matches_in_process(tmp_path, case):
    """Each Ray SuperNode reads only its client file of a federation folder; the result equals
    the in-process simulation from the whole dataset."""
    data, partition, common = CASES[case]
    write_federation(data, tmp_path / "fed", clients=2, partition=partition)
    spec = parse_run_config({**common, "federation": str(tmp_path / "fed"), "out": str(tmp_path / "flwr.json")})
    home, bin_dir, env = _flower_env(tmp_path)
    run_config = " ".join(f"{k}={_toml_value(v)}" for k, v in spec.flower_config().items())
    flwr = str(Path(bin_dir) / "flwr")
    try:
        done = subprocess.run([flwr, "run", str(find_app_dir()), "--federation-config",
                               "num-supernodes=2 client-resources-num-cpus=1", "--run-config", run_config, "--stream"],
                              env=env, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        # `flwr run --stream` exits 0 even when the ServerApp failed: check the run's status
        for _ in range(30):
            ls = subprocess.run([flwr, "ls", "--format", "json"], env=env, capture_output=True, text=True,
                                timeout=60, check=False)
            runs = json.loads(ls.stdout)["runs"]
            if runs and runs[0]["status"].startswith("finished"):
                break
            time.sleep(1)
        assert runs[0]["status"] == "finished:completed", runs
    finally:
        _kill_tree(_pids_of(f"{home}/local-superlink"))
    flwr_result = json.loads((tmp_path / "flwr.json").read_text())
    local = run_in_process(parse_run_config({**common, "data": data}))
    assert flwr_result["data"] == f"federation:{tmp_path / 'fed'}"
    # Ray's actors run torch on one thread, this process on two: float32 sums may differ in
    # the last digit kept (6 decimals), so metrics are compared to 2e-6
    assert flwr_result["rounds"] == 2 and len(flwr_result["history"]) == len(local["history"])
    for a, b in [*zip(flwr_result["history"], local["history"], strict=True), ({"test": flwr_result["test"]},
                                                                                 {"test": local["test"]})]:
        for stage in ("train", "valid", "test"):
            assert set(a.get(stage, {})) == set(b.get(stage, {}))
            for k, v in a.get(stage, {}).items():
                if isinstance(v, float):
                    assert v == pytest.approx(b[stage][k], abs=2e-6), (stage, k)
                elif k == "failed":  # node ids differ between runtimes; clients and reasons do not
                    assert [(f["client"], f["reason"]) for f in v] == [(f["client"], f["reason"]) for f in b[stage][k]]
                else:
                    assert v == b[stage][k], (stage, k)
    if case == "mrff":
        assert all(len(h["train"]["failed"]) == 1 and len(h["train"]["clients"]) == 1 for h in flwr_result["history"])
        assert flwr_result["test"]["n"] == 24  # both clients evaluated


def test_fedrec_launch_reports_a_refused_run_in_one_line(tmp_path):
    """Through ``fedrec launch`` on the simulation engine: more ``shards`` than SuperNodes is
    refused at once (not after ``node-wait``), and a node's missing data file ends the run;
    each time stderr holds one ``fedrec: error:`` line (fedrec's message, the status, the
    log file), exit 1, and the full log names the error in one line, without a traceback."""
    home, bin_dir, env = _flower_env(tmp_path)
    cases = [
        ('shards=3 rounds=1 data="synthetic:users=24,items=40"',
         "run config 'shards' is 3, but this Flower simulation has 2 SuperNode(s): set shards=2, or run with "
         "--federation-config num-supernodes=3"),
        (f'shards=2 rounds=1 task="next_item" data="seq:{tmp_path / "missing.txt"}"',
         f"{tmp_path / 'missing.txt'}: file not found"),
    ]
    try:
        for i, (run_config, message) in enumerate(cases):
            log = tmp_path / f"run{i}.log"
            start = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "fedrec.cli", "launch", "--app", str(find_app_dir()),
                                   "--run-config", run_config, "--federation-config",
                                   "num-supernodes=2 client-resources-num-cpus=1", "--log", str(log)],
                                  env=env, capture_output=True, text=True, timeout=600, check=False)
            assert done.returncode == 1, done.stdout + done.stderr
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("fedrec: error: "), done.stderr
            assert message in lines[0] and "finished:failed" in lines[0] and f"full log: {log}" in lines[0]
            assert time.monotonic() - start < 300  # not the 300 s of node-wait
            text = log.read_text()
            assert f"fedrec: error: {message}" in text  # the server's line, or the node's
            assert "Traceback" not in text, text[-3000:]
    finally:
        _kill_tree(_pids_of(f"{home}/local-superlink"))
