"""The Flower apps driven in-process (no Ray): ServerApp + ClientApp + role-aware strategy."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fedrec.errors import ConfigError
from fedrec.federated.runner import find_app_dir, run_in_process
from fedrec.federated.nodedata import node_data
from fedrec.federated.spec import parse_run_config

TINY = {"data": "synthetic:users=24,items=40,seed=2", "rounds": 2, "shards": 2, "model.dim": 16,
        "model.max-len": 20}


def _strip(result):
    return {k: v for k, v in result.items() if k not in ("seconds",)}


def test_in_process_run_reports_best_round_and_history():
    result = run_in_process(parse_run_config(TINY))
    assert result["algorithm"] == "mrff" and result["rounds"] == 2 and result["nodes"] == 2
    assert [h["round"] for h in result["history"]] == [1, 2]
    best = next(h for h in result["history"] if h["round"] == result["best_round"])
    assert result["valid"] == best["valid"] and result["test"] == best["test"]
    assert result["valid"]["n"] == 24 and 0.0 <= result["test"]["auc"] <= 1.0
    assert all(h["train"]["users"] == 24 for h in result["history"])
    counts = result["history"][0]["train"]["group-counts"]  # (layers, G) users per group
    assert len(counts) == 2 and all(sum(layer) == 24 for layer in counts)


def test_same_seed_same_result_other_seed_differs():
    a = run_in_process(parse_run_config(TINY))
    b = run_in_process(parse_run_config(TINY))
    c = run_in_process(parse_run_config({**TINY, "seed": 1}))
    assert _strip(a)["history"] == _strip(b)["history"]
    assert a["history"] != c["history"]


def test_number_of_shards_does_not_change_the_result_without_dropout():
    base = {**TINY, "model.dropout": 0.0, "optimizer": "sgd"}
    one = run_in_process(parse_run_config({**base, "shards": 1}))
    three = run_in_process(parse_run_config({**base, "shards": 3}))
    for h1, h3 in zip(one["history"], three["history"], strict=True):
        assert h1["valid"]["auc"] == pytest.approx(h3["valid"]["auc"], abs=1e-4)
        assert h1["valid"]["logloss"] == pytest.approx(h3["valid"]["logloss"], abs=1e-5)


def test_run_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown key 'round'"):
        parse_run_config({"round": 3})
    with pytest.raises(ConfigError, match="'rounds' must be >= 1"):
        parse_run_config({"rounds": 0})
    with pytest.raises(ConfigError, match="shard 2 is not in 0..1"):
        node_data(parse_run_config({}), {"shard": 2, "shards": 2})
    with pytest.raises(ConfigError, match="needs 'shard' and 'shards'"):
        node_data(parse_run_config({}), {})


def test_spec_round_trips_through_flat_keys():
    spec = parse_run_config({**TINY, "lr": 0.5, "model.groups": 2})
    assert parse_run_config(spec.to_flat()) == spec


def test_app_dir_is_the_project():
    assert (find_app_dir() / "clients" / "app.py").exists()


def test_cli_simulate_json_and_errors(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "fedrec.cli", "simulate", "--data", TINY["data"], "--rounds", "1", "-n", "2",
           "--set", "model.dim=16", "--set", "model.max-len=20", "--json", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert {"algorithm", "rounds", "valid", "test", "history"} <= set(printed)
    assert json.loads(out.read_text())["test"] == printed["test"]
    bad = subprocess.run([sys.executable, "-m", "fedrec.cli", "simulate", "--algorithm", "fedsgd", "--rounds", "1"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "unknown algorithm 'fedsgd'" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_dirichlet_partition_gives_every_user_one_shard():
    spec = parse_run_config({**TINY, "partition": "dirichlet", "partition-alpha": 0.3, "shards": 3})
    nodes = [node_data(spec, {"shard": i, "shards": 3}) for i in range(3)]
    raw = [n.split.user_raw[1:] for n in nodes]
    together = np.sort(np.concatenate(raw))
    assert len(together) == 24 and len(np.unique(together)) == 24
    # users are local to each node; items come from the one shared catalogue
    assert all(n.split.n_users == len(r) for n, r in zip(nodes, raw))
    assert len({n.catalogue.fingerprint() for n in nodes}) == 1
    result = run_in_process(spec)
    assert result["valid"]["n"] == 24


def test_simulate_defaults_per_format_and_user_keys_win(tmp_path):
    from fedrec.cli import _simulate_spec

    spec = _simulate_spec("kuaisar:/data/KuaiSAR-R", None, None, rounds=None)
    assert spec.model_options == {"item-repr": "attributes"}
    assert spec.federated.rounds == 60 and spec.task == "ctr"
    spec = _simulate_spec("kuaisar:/data/KuaiSAR-R", None, ["model.item-repr=both", "lr=0.05"], rounds=5)
    assert spec.model_options["item-repr"] == "both" and spec.federated.lr == 0.05 and spec.federated.rounds == 5
    cfg = tmp_path / "run.toml"
    cfg.write_text('data = "seq:/x/LastFM.txt"\nrounds = 7\n[model]\ndim = 32\n')
    spec = _simulate_spec(None, cfg, None, rounds=None)
    assert spec.task == "next_item" and spec.federated.protocol == "sampled-99"
    # the file's dim wins; the other widths and the next-item protocol are the seq defaults
    assert spec.federated.rounds == 7 and spec.model_options == {"dim": 32, "heads": 2, "dropout": 0.5,
                                                                 "max-len": 50, "next-loss": "bce"}
    assert spec.federated.negatives == 4 and spec.federated.fraction == 1.0 and spec.shards == 1
    assert _simulate_spec(None, None, None).data == "synthetic:users=600"
    # snake-case user keys replace the kebab-case defaults (one key, not two)
    spec = _simulate_spec("kuaisar:/data/KuaiSAR-R", None, ["model.item_repr=id", "eval_every=2"])
    assert spec.model_options == {"item-repr": "id"} and spec.federated.eval_every == 2
    spec = _simulate_spec("kuaisar:/data/KuaiSAR-R", None, ["model-options=item-repr=both,dim=32"])
    assert spec.model_options == {"item-repr": "both", "dim": "32"}


@pytest.mark.parametrize("protocol", ["full", "sampled-99"])
def test_next_item_runs_through_the_apps(protocol):
    # 200 items: sampled-99 needs 99 distinct unseen items per user
    result = run_in_process(parse_run_config({**TINY, "task": "next_item", "algorithm": "fedavg", "rounds": 1,
                                              "protocol": protocol, "data": "synthetic:users=24,items=200,seed=2"}))
    assert result["protocol"] == protocol and result["selection"] == "valid ndcg@10"
    assert 0.0 <= result["test"]["hr@10"] <= 1.0 and result["test"]["n"] > 0


@pytest.mark.parametrize("args,needle", [
    (["--data", "kuaisar:/nonexistent/KuaiSAR-R"], "directory not found"),
    (["--set", "lr=-1"], "'lr' must be > 0"),
    (["--set", "model.groups=0"], "'groups' must be a positive integer"),
    (["--set", "partition=random"], "'partition' must be one of"),
])
def test_cli_simulate_bad_input_is_one_line(args, needle, tmp_path):
    out = tmp_path / "never.json"
    done = subprocess.run([sys.executable, "-m", "fedrec.cli", "simulate", "--rounds", "1", "--out", str(out), *args],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()


def test_early_stopping_ends_the_run_without_an_error():
    # lr so small that validation never improves after the first evaluation: with patience 1
    # the run stops after round 2; the remaining rounds send nothing (this used to fail with
    # "0 node(s) replied")
    result = run_in_process(parse_run_config({**TINY, "rounds": 5, "eval-every": 1, "patience": 1, "lr": 1e-12}))
    rounds = [h["round"] for h in result["history"]]
    assert rounds == [1, 2]
    assert result["best_round"] == 1
