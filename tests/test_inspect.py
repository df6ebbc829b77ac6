"""Group discovery report: hand cases for NMI and the spread, and the CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from fedrec.inspect import group_report


def test_perfect_and_uninformative_routing():
    users = np.arange(1, 9)
    truth = np.array([-1, 0, 0, 1, 1, 0, 0, 1, 1])  # indexed by user index (0 = padding)
    perfect = np.stack([truth[users], np.zeros(8, dtype=int)], axis=1)  # layer 1 sends everyone to group 0
    report = group_report(users, perfect, 2, truth)
    assert report["layers"][0]["nmi"] == 1.0
    assert report["layers"][1]["nmi"] == 0.0
    assert report["layers"][0]["users_per_group"] == [4, 4]
    assert report["layers"][1]["users_per_group"] == [8, 0]


def test_counts_contingency_and_combinations():
    users = np.array([1, 2, 3, 4])
    routes = np.array([[0, 1], [0, 1], [1, 0], [1, 1]])
    truth = np.array([0, 1, 1, 2, 2])
    report = group_report(users, routes, 2, truth)
    assert report["layers"][0]["users_per_group"] == [2, 2]
    assert report["layers"][1]["users_per_group"] == [1, 3]
    assert report["combinations_used"] == 3
    assert report["layers"][0]["contingency"] == [[2, 0], [0, 2]]
    assert report["layers"][0]["nmi"] == 1.0 and 0.0 <= report["layers"][0]["nmi_chance"] < 1.0


def test_cli_inspect_groups_writes_json_and_png(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "fedrec.cli", "inspect", "groups", "--data", "synthetic:users=60,items=50,groups=3,seed=1",
         "--epochs", "1", "--set", "dim=16", "--set", "max-len=12", "--set", "groups=3", "--out", str(tmp_path), "--json"],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["groups"] == 3 and len(report["layers"]) == 2
    assert sum(report["layers"][0]["users_per_group"]) == report["users"] == 60
    assert 0.0 <= report["nmi_combined"] <= 1.0
    assert (tmp_path / "groups.png").stat().st_size > 1000
    assert json.loads((tmp_path / "groups.json").read_text())["users"] == 60


def test_cli_inspect_groups_trains_with_the_per_dataset_defaults(tmp_path):
    """Without a checkpoint, the MRFF it reports on is the one a bare `fedrec train --model
    mrff` trains: the format's defaults (synthetic: patience 5) under the user's flags."""
    from fedrec.defaults import resolve

    spec = "synthetic:users=40,items=30,groups=2,seed=2"
    run = subprocess.run(
        [sys.executable, "-m", "fedrec.cli", "inspect", "groups", "--data", spec, "--epochs", "1",
         "--set", "dim=16", "--set", "max-len=8", "--out", str(tmp_path), "--json"],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    resolved = json.loads(run.stdout)["resolved"]
    expected = resolve(spec, runtime="centralised", model="mrff",
                       user={"epochs": 1, "model.dim": 16, "model.max-len": 8}).record()
    assert resolved["options"]["patience"] == expected["options"]["patience"] == 5
    assert resolved["defaults"] == expected["defaults"] and resolved["options"]["epochs"] == 1


def test_kmeans_nmi_finds_separated_groups_and_not_noise():
    """k-means on features that separate the true groups recovers them (NMI near 1); on
    features independent of them it does not (near 0)."""
    from fedrec.inspect import kmeans_nmi

    rng = np.random.default_rng(0)
    truth = rng.integers(4, size=400)
    centres = rng.normal(size=(4, 6)) * 5
    assert kmeans_nmi(centres[truth] + rng.normal(size=(400, 6)), truth, 4) > 0.9
    assert kmeans_nmi(rng.normal(size=(400, 6)), truth, 4) < 0.05


def test_user_gate_inputs_are_what_the_router_reads():
    """Per layer, one row per user; routing those rows through the layer's gate gives the
    groups route_users reports."""
    import torch

    from fedrec.data import load_dataset
    from fedrec.data.split import split_dataset
    from fedrec.inspect import route_users, user_gate_inputs
    from fedrec.models.base import ModelData
    from fedrec.models.registry import create_model

    split = split_dataset(load_dataset("synthetic:users=40,items=60,seed=3"))
    model = create_model("mrff", ModelData.from_split(split), {"max-len": 20}, task="ctr")
    users, inputs = user_gate_inputs(model, split)
    routed_users, routes = route_users(model, split)
    assert (users == routed_users).all() and len(inputs) == model.cfg.layers
    for layer, x in enumerate(inputs):
        assert x.shape[0] == len(users)
        with torch.no_grad():
            chosen = model.ffns[layer].gate(torch.from_numpy(x)).argmax(-1).numpy()
        assert (chosen == routes[:, layer]).all()
