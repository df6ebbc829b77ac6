"""Checkpoint and resume: a run killed mid-way and resumed ends with the same parameters,
metrics and privacy spent as an uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from fedrec.errors import ConfigError
from fedrec.federated.checkpoint import load_client, load_server, save_client
from fedrec.federated.runner import run_in_process
from fedrec.federated.spec import parse_run_config

FLAT = {"data": "synthetic:users=24,items=40,seed=2", "rounds": 8, "shards": 2, "model.dim": 16,
        "model.max-len": 20, "noise-multiplier": 0.8, "dp-noise-seed": 3, "eval-every": 2}


def _cli(flat: dict, *extra: str) -> list[str]:
    flat = dict(flat)
    args = [sys.executable, "-m", "fedrec.cli", "simulate", "--json", "--data", flat.pop("data", FLAT["data"])]
    for k, v in flat.items():
        args += ["--set", f"{k}={v}"]
    return args + list(extra)


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    ck = tmp_path / "ck"
    flat = {**FLAT, "checkpoint-dir": ck, "checkpoint-every": 1}
    proc = subprocess.Popen(_cli(flat), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if (ck / "server.pt").exists() and load_server(ck)["round"] >= 3:
            proc.kill()
            proc.wait()
            killed_at = load_server(ck)["round"]
            break
        time.sleep(0.05)
    assert killed_at is not None and killed_at < 8, "the run was not killed mid-way"
    assert proc.returncode == -9
    resumed = subprocess.run(_cli({**flat, "resume": "true"}), capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    res = json.loads(resumed.stdout.strip().splitlines()[-1])
    plain = run_in_process(parse_run_config(FLAT))
    assert [h["round"] for h in res["history"]] == list(range(1, 9))
    # the resumed nodes say they took their private state from the checkpoint ...
    restored = [x for h in res["history"] for x in h["train"].pop("restored", [])]
    assert restored and {x["client"] for x in restored} == {0, 1}
    assert res["history"] == plain["history"]  # ... and every round's train and eval metrics, epsilon included
    assert res["test"] == plain["test"] and res["best_round"] == plain["best_round"]
    assert res["privacy"] == plain["privacy"]
    # the final global parameters too
    assert load_server(ck)["round"] == 8
    final = load_server(ck)["global"]
    ck2 = tmp_path / "ck2"
    run_in_process(parse_run_config({**FLAT, "checkpoint-dir": str(ck2), "checkpoint-every": 8}))
    for name, value in load_server(ck2)["global"].items():
        assert torch.equal(value, final[name]), name


def test_checkpoint_options_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="need 'checkpoint-dir'"):
        parse_run_config({"checkpoint-every": 2})
    with pytest.raises(ConfigError, match="need 'checkpoint-dir'"):
        parse_run_config({"resume": True})
    with pytest.raises(ConfigError, match="no server checkpoint"):
        load_server(tmp_path)
    with pytest.raises(ConfigError, match="no checkpoint of shard 0 at round 3"):
        load_client(tmp_path, shard=0, round=3)
    done = subprocess.run(_cli({"rounds": 1, "checkpoint-dir": tmp_path / "none", "resume": "true"}),
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "no server checkpoint" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_client_checkpoints_keep_the_last_two_rounds(tmp_path):
    for r in range(1, 5):
        save_client(tmp_path, shard=1, round=r, state={"users": torch.arange(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client-1-round3.pt", "client-1-round4.pt"]
