"""The table scripts under simulations/: run_table.py with resumable states, and
reevaluate.py scoring those states again on fixed negatives."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "simulations"))

import reevaluate  # noqa: E402
from conftest import write_negatives  # noqa: E402
import run_table  # noqa: E402

from fedrec.data import load_dataset  # noqa: E402
from fedrec.data.split import split_dataset  # noqa: E402

SPEC = "synthetic:users=40,items=200,groups=2,min_len=8,max_len=12,seed=4"

CONFIG = f'''
title = "tiny"
data = "{SPEC}"
task = "next_item"
metrics = ["hr@10", "full/hr@10"]

[train]
epochs = 2
batch-size = 16
protocol = "sampled-99"
also-test = "full"
negatives-file = "{{data_root}}/neg.txt"

[[runs]]
name = "popularity"
model = "popularity"

[[runs]]
name = "SASRec"
model = "sasrec"
dim = 16
max-len = 10
'''


def test_run_table_then_reevaluate(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(CONFIG)
    write_negatives(split_dataset(load_dataset(SPEC)), tmp_path / "neg.txt", seed=1)
    out, states = tmp_path / "out", tmp_path / "states"
    common = ["--seeds", "0", "1", "--data-root", str(tmp_path), "--out-dir", str(out)]
    assert run_table.main([str(config), *common, "--state-dir", str(states)]) == 0
    table = json.loads((out / "tiny.json").read_text())
    assert set(table) == {"popularity/seed0", "popularity/seed1", "SASRec/seed0", "SASRec/seed1"}
    # the results name the negatives file as the config does, not by this machine's path
    assert table["SASRec/seed0"]["train"]["negatives_file"] == "{data_root}/neg.txt"
    assert "| SASRec |" in (out / "tiny.md").read_text()
    # who was evaluated is stated next to the numbers (positives only on this click log)
    pop = table["SASRec/seed0"]["population"]
    assert 0 < pop["test"]["users"] <= pop["users"] == 40 and "positive" in pop["rule"]
    assert f"Evaluated: {pop['test']['users']} of 40 users at test (positives only" in (out / "tiny.md").read_text()
    # re-scoring the states on the same fixed negatives repeats the table's test numbers
    assert reevaluate.main([str(config), *common, "--state-dir", str(states),
                            "--negatives-file", "{data_root}/neg.txt"]) == 0
    again = json.loads((out / "tiny_sampled-99-neg.json").read_text())
    assert again["missing"] == []
    for key in ("SASRec/seed0", "SASRec/seed1", "popularity/seed0"):
        assert again["runs"][key]["test"] == table[key]["test"]
    # on uniform negatives they differ, and a state that is not there is listed as missing
    (states / "tiny-SASRec-seed1.pt").unlink()
    assert reevaluate.main([str(config), *common, "--state-dir", str(states)]) == 0
    uniform = json.loads((out / "tiny_sampled-99.json").read_text())
    assert uniform["missing"] == ["SASRec/seed1"] and uniform["unfinished"] == []
    assert uniform["runs"]["SASRec/seed0"]["test"] != table["SASRec/seed0"]["test"]
    # a run still training is not scored (its best epoch is not final)
    import torch

    saved = torch.load(states / "tiny-SASRec-seed0.pt", weights_only=False)
    torch.save({**saved, "finished": False}, states / "tiny-SASRec-seed0.pt")
    assert reevaluate.main([str(config), *common, "--state-dir", str(states)]) == 0
    partial = json.loads((out / "tiny_sampled-99.json").read_text())
    assert partial["unfinished"] == ["SASRec/seed0"] and "SASRec/seed0" not in partial["runs"]
    assert "Still training (not scored): SASRec/seed0" in (out / "tiny_sampled-99.md").read_text()


def test_reevaluate_bad_negatives_file_is_one_line(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(CONFIG)
    (tmp_path / "neg.txt").write_text("1 2\n")
    code = reevaluate.main([str(config), "--state-dir", str(tmp_path), "--seeds", "0", "--data-root", str(tmp_path),
                            "--out-dir", str(tmp_path / "out"), "--negatives-file", "{data_root}/neg.txt"])
    err = capsys.readouterr().err
    assert code == 2 and "neg.txt, line 1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_federation_equality_script_finds_no_difference(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import ROOT

    done = subprocess.run([sys.executable, str(ROOT / "simulations" / "federation_equality.py"),
                           "synthetic:users=30,items=40,seed=5", "--clients", "2", "--rounds", "2",
                           "--name", "tiny", "--out-dir", str(tmp_path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "federation_equality_tiny.json").read_text())
    assert report["max_abs_difference"] <= 1e-6 and report["metrics_compared"] > 10
    assert "`synthetic:users=30,items=40,seed=5`" in (tmp_path / "federation_equality.md").read_text()


def test_group_discovery_script_central_and_federated(tmp_path):
    """A tiny run of both modes: reports with NMI per layer, the largest group's share and
    the per-round routing history (share and changed users)."""
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[1] / "simulations" / "group_discovery.py"
    spec = importlib.util.spec_from_file_location("group_discovery", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gd.json"
    assert module.main(["--users", "60", "--epochs", "1", "--rounds", "2", "--seeds", "0",
                        "--variants", "default", "--out", str(out)]) == 0
    reports = json.loads(out.read_text())
    assert {r["mode"] for r in reports} == {"central", "federated"}
    for r in reports:
        assert len(r["summary"]["nmi"]) == 2 and all(0 < s <= 1 for s in r["summary"]["largest_share"])
    fed = next(r for r in reports if r["mode"] == "federated")
    assert fed["history"][1]["changed"] is not None and len(fed["history"][1]["share"]) == 2
    assert (tmp_path / "gd_federated_default.png").exists()
    # the k-means of the trained gate's input per layer, and of the data alone beside it
    central = next(r for r in reports if r["mode"] == "central")
    assert len(central["kmeans_gate_input"]) == 2 and all(0 <= x <= 1 for x in central["kmeans_gate_input"])
    assert "k-means on the gate input" in module.markdown_table(reports)
    reference = json.loads((tmp_path / module.REFERENCE).read_text())
    ref = reference["synthetic:users=60,groups=4,seed=0"]
    assert set(ref) == {"category share of impressions", "click rate per category", "both", "clicked items (SVD 16)",
                        "profile segment"}
    assert all(0 <= v <= 1 for v in ref.values())
    # a centralised report from before the k-means existed is run again, in its place
    del reports[0]["kmeans_gate_input"]
    out.write_text(json.dumps(reports))
    assert module.main(["--users", "60", "--epochs", "1", "--rounds", "2", "--seeds", "0",
                        "--variants", "default", "--out", str(out), "--resume"]) == 0
    again = json.loads(out.read_text())
    assert [r["mode"] for r in again] == [r["mode"] for r in reports] and "kmeans_gate_input" in again[0]
    # resume skips the finished cells
    assert module.main(["--users", "60", "--epochs", "1", "--rounds", "2", "--seeds", "0",
                        "--variants", "default", "--out", str(out), "--resume"]) == 0
    assert len(json.loads(out.read_text())) == 2


def test_bench_cdr_measures_epoch_round_psi_and_upload(tmp_path, capsys):
    import bench_cdr

    out = tmp_path / "bench.json"
    assert bench_cdr.main(["--data", "synthetic:users=80,domains=2,overlap=0.5,items=120,seed=2", "--json",
                           "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(out.read_text())
    assert result["epoch_seconds"] >= 0 and result["round_seconds"] >= 0 and result["psi_seconds"] >= 0
    assert result["common_users"] > 0 and result["train_examples"] > 0
    for domain in result["per_domain"].values():
        # a domain sends only the rows of common users, fewer than its whole table
        assert 0 < domain["rows_sent"] <= result["common_users"] < domain["users"]
        assert domain["rows_bytes"] < domain["full_table_bytes"]
        assert domain["upload_bytes"] == domain["rows_bytes"] + domain["aggregator_bytes"]
    assert bench_cdr.main(["--data", "synthetic:users=20,items=30"]) == 2  # one domain: a one-line error


def test_results_page_group_routing_table_is_rendered_from_the_json():
    import group_discovery

    results = json.loads((ROOT / "simulations" / "results" / "group_discovery.json").read_text())
    assert group_discovery.markdown_table(results) in (ROOT / "simulations" / "results" / "README.md").read_text()


def test_bench_marm_measures_hit_rate_memory_and_compute(tmp_path, capsys):
    import bench_marm

    out = tmp_path / "bench.json"
    assert bench_marm.main(["--data", "synthetic:users=60,items=80,seed=1", "--epochs", "1", "--layers", "1",
                            "--layers", "2", "--repeat", "1", "--max-len", "20", "--json", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(out.read_text())
    one, two = result["by_layers"]["1"], result["by_layers"]["2"]
    assert one["hit_rate"] is None and one["entries"] == 0 and one["flops_saved"] == 1.0
    assert 0.8 < two["hit_rate"] <= 1.0 and two["entries"] > 0
    assert two["megabytes"] == round(two["entries"] * 32 * 4 / 2**20, 3)  # (L - 1) x dim float32 per entry
    assert two["flops_recomputed"] > two["flops_cached"] == 2 * one["flops_cached"]
    assert two["ms_cached"] > 0 and two["ms_recomputed"] > 0
    assert 0.0 <= two["test_auc_cached"] <= 1.0
    assert bench_marm.main(["--data", "synthetic:users=20,items=30", "--set", "layers"]) == 2


def test_attacks_script_records_rows_renders_them_and_skips_what_it_has(tmp_path, capsys):
    """simulations/attacks.py on tiny synthetic data: every row evaluated on the same honest
    users and target, the table rendered from the JSON, a recorded row skipped on rerun."""
    import attacks

    out = tmp_path / "attacks.json"
    argv = ["--data", SPEC, "--clients", "5", "--rounds", "2", "--eval-every", "1",
            "--rows", "clean", "promotion-median", "--set", "model.dim=8", "--out", str(out), "--no-progress"]
    assert attacks.main(argv) == 0
    results = json.loads(out.read_text())
    assert set(results) == {"clean/seed0", "promotion-median/seed0"}
    clean, defended = results["clean/seed0"], results["promotion-median/seed0"]
    assert clean["test"]["n"] == defended["test"]["n"] and clean["attack"]["target"] == defended["attack"]["target"]
    assert defended["config"]["robust"] == "median" and "er@10" in defended["test"]
    table = out.with_suffix(".md").read_text()
    assert "| item promotion + median | item-promotion | median |" in table and "attacks.json" in table
    capsys.readouterr()
    assert attacks.main(argv) == 0
    assert capsys.readouterr().err.count("recorded, skipped") == 2
def test_client_failures_script_resumes_and_renders(tmp_path, monkeypatch, capsys):
    """simulations/client_failures.py on tiny synthetic data: one run per fraction in the JSON
    (config, valid/test with the AUC bound, best round, seconds, failure summary), the table
    rendered from it; a second call skips what is recorded; --only runs one fraction; a bad
    fraction is one line."""
    import client_failures

    from conftest import ROOT

    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    common = ["--data", "synthetic:users=36,items=150,seed=3", "--clients", "5", "--rounds", "2", "--out-dir",
              str(out), "--no-progress"]
    assert client_failures.main([*common, "--fractions", "0", "0.4", "--only", "0.4"]) == 0
    recorded = json.loads((out / "client_failures.json").read_text())
    assert set(recorded) == {"client-failure=0.4"}
    cell = recorded["client-failure=0.4"]
    assert cell["failing_per_round"] == 2 and cell["config"]["client-failure"] == 0.4 and cell["config"]["shards"] == 5
    assert cell["rounds"] == 2 and cell["protocol_rounds"] == 60 and "auc-error-bound" in cell["test"]
    assert cell["failures"]["uploads_failed"] == 4 and cell["failures"]["uploads_arrived"] == 6
    assert cell["failures"]["reasons"] == {"simulated failure (client-failure 0.4)": 4}
    assert cell["failures"]["evaluation_failures"] == 0 and cell["test"]["n"] == 36
    assert client_failures.main([*common, "--fractions", "0", "0.4"]) == 0  # adds 0, keeps 0.4
    again = json.loads((out / "client_failures.json").read_text())
    assert set(again) == {"client-failure=0", "client-failure=0.4"} and again["client-failure=0.4"] == cell
    assert client_failures.main([*common, "--fractions", "0.4", "--seeds", "1"]) == 0  # another seed: its own run
    seeded = json.loads((out / "client_failures.json").read_text())
    assert seeded["client-failure=0.4/seed1"]["config"]["seed"] == 1 and seeded["client-failure=0.4"] == cell
    del seeded["client-failure=0.4/seed1"]
    (out / "client_failures.json").write_text(json.dumps(seeded))

    def no_run(*a, **k):
        raise AssertionError("a recorded run ran again")

    monkeypatch.setattr(client_failures, "run_one", no_run)
    assert client_failures.main([*common, "--fractions", "0", "0.4"]) == 0
    table = (out / "client_failures.md").read_text()
    assert "| 0.4 | 0 | 2 of 5 | 2 |" in table and "| 0 | 0 | 0 of 5 | 2 |" in table and "shortened" in table
    assert table == client_failures.markdown(again)
    late = [h["test"]["auc"] for h in again["client-failure=0.4"]["history"] if h["round"] > 1 and "test" in h]
    assert client_failures.late_mean(again["client-failure=0.4"]) == pytest.approx(sum(late) / len(late))

    with pytest.raises(SystemExit):
        client_failures.main([*common, "--fractions", "1"])
    assert "must be in [0, 1)" in capsys.readouterr().err


def test_bench_scale_measures_each_size_in_its_own_process(tmp_path, capsys):
    """Tiny sizes end to end: every size and sweep point measured (one subprocess each), the
    per-user private state the same at every size, the JSON and its Markdown table written."""
    import bench_scale

    out = tmp_path / "scale.json"
    assert bench_scale.main(["--users", "120", "240", "--chunk-size", "32", "--chunk-sweep", "--shard-sweep", "3",
                             "--sweep-users", "120", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert [r["users"] for r in doc["users"]] == [120, 240] and doc["shard_sweep"][0]["shards"] == 3
    for r in doc["users"] + doc["shard_sweep"]:
        assert "stopped" not in r, r
        assert r["users_trained"] == r["users"] and r["round_s"] > 0 and r["peak_mb"] >= r["round_peak_mb"] > 0
        assert r["interactions"] == 10 * r["users"]  # the fixed sequence length
    assert doc["users"][0]["private_state_bytes_per_user"] == doc["users"][1]["private_state_bytes_per_user"] > 0
    assert [r["users"] for r in doc["ratios"]] == [120, 240] and "µs/user" in printed
    table = out.with_suffix(".md").read_text()
    assert "| 240 | 32 | 1 |" in table and "| 120 | 32 | 3 |" in table


def test_bench_scale_skips_what_would_pass_the_memory_cap(monkeypatch):
    """A size projected (linearly) past the cap is not run, and says so, with its extrapolation."""
    import bench_scale

    ran = []

    def fake(users, chunk, shards, cap, timeout):
        ran.append(users)
        mb = 100 + users / 100  # 1 MB per 100 users
        return {"users": users, "chunk_size": chunk, "shards": shards, "peak_mb": mb, "data_s": users / 1e3,
                "setup_s": 0.1, "round_s": users / 1e4, "evaluate_s": 0.1, "round_working_mb": 5.0,
                "evaluate_working_mb": 1.0, "private_state_bytes_per_user": 896.0}

    monkeypatch.setattr(bench_scale, "run_one", fake)
    rows = bench_scale.series([(1000, 8, 1), (2000, 8, 1), (10**6, 8, 1)], cap_gb=1.0, timeout=10, label="t")
    assert ran == [1000, 2000]
    assert rows[2]["stopped"].startswith("not run: projected peak 9.9 GiB > cap 1 GiB")
    assert rows[2]["extrapolated"]["peak_mb"] == pytest.approx(100 + 10**4) and rows[2]["extrapolated"]["round_s"] == 100
    assert "~10100 (extrapolated)" in bench_scale.markdown({"data": "d", "model": {}, "threads": 1, "machine": "m",
                                                           "users": rows})
