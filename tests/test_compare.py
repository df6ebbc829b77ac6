"""`fedrec compare`: federated and centralised rows on one split, table/CSV/PNG, resumable."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from fedrec.compare import load_comparison, run_comparison
from fedrec.errors import ConfigError

CONFIG = """
title = "tiny"
data = "synthetic:users=24,items=40,seed=2"
task = "ctr"

[federated]
rounds = 2
shards = 2

[train]
epochs = 2

[[runs]]
name = "fed"
kind = "federated"
algorithm = "mrff"
[runs.options]
dim = 16
max-len = 20

[[runs]]
name = "central"
kind = "centralised"
model = "mrff"
[runs.options]
dim = 16
max-len = 20
"""


def test_compare_writes_table_csv_and_curves_and_resumes(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(CONFIG)
    cfg = load_comparison(path)
    out = tmp_path / "out"
    results = run_comparison(cfg, seeds=[0], out_dir=out)
    assert set(results) == {"fed/seed0", "central/seed0"}
    assert results["fed/seed0"]["kind"] == "federated" and results["fed/seed0"]["curve"]["x"] == "round"
    assert len(results["central/seed0"]["curve"]["points"]) == 2
    rows = list(csv.DictReader(open(out / "tiny.csv")))
    assert [r["row"] for r in rows] == ["fed", "central"]
    assert float(rows[0]["test auc"]) == pytest.approx(results["fed/seed0"]["test"]["auc"])
    assert "| fed | federated |" in (out / "tiny.md").read_text()
    assert (out / "tiny_curves.png").stat().st_size > 1000
    # resumable: a second call runs nothing new and keeps the numbers
    before = json.loads((out / "tiny.json").read_text())
    again = run_comparison(cfg, seeds=[0], out_dir=out)
    assert again == before


def test_compare_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('data = "synthetic:"\n[[runs]]\nname = "x"\nkind = "central"\n')
    with pytest.raises(ConfigError, match="needs a 'name' and a 'kind'"):
        load_comparison(bad)
    bad.write_text('data = "kuaisar:{data_root}/K"\n[[runs]]\nname = "x"\nkind = "centralised"\nmodel = "mrff"\n')
    with pytest.raises(ConfigError, match="pass --data-root"):
        load_comparison(bad)
    done = subprocess.run([sys.executable, "-m", "fedrec.cli", "compare", str(tmp_path / "missing.toml")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "config file not found" in done.stderr


def test_changed_row_config_reruns_on_resume(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(CONFIG)
    out = tmp_path / "out"
    first = run_comparison(load_comparison(path), seeds=[0], out_dir=out, only=["central"])
    path.write_text(CONFIG.replace("[train]\nepochs = 2", "[train]\nepochs = 1"))
    second = run_comparison(load_comparison(path), seeds=[0], out_dir=out, only=["central"])
    assert len(first["central/seed0"]["history"]) == 2 and len(second["central/seed0"]["history"]) == 1


def test_table_shows_the_auc_error_bound_where_it_exceeds_0001(tmp_path):
    """A federated AUC carries the server's histogram bound: the table shows the mean of the
    seeds' bounds next to it when above 0.001 (never for exact centralised AUCs), the CSV
    always; re-rendering from results alone draws no plot when asked not to."""
    from fedrec.compare import write_outputs

    cfg = {"stem": "t", "title": "t", "data_display": "synthetic:", "task": "ctr",
           "runs": [{"name": "fed", "kind": "federated"}, {"name": "tight", "kind": "federated"},
                    {"name": "central", "kind": "centralised", "model": "user_ctr"}]}

    def run(row, kind, auc, bound=None):
        test = {"auc": auc, "logloss": 0.6, **({"auc-error-bound": bound} if kind == "federated" else {})}
        return {"row": row, "kind": kind, "test": test, "best_round": 5, "seconds": 1.0}

    results = {"fed/seed0": run("fed", "federated", 0.60, 0.02), "fed/seed1": run("fed", "federated", 0.62, 0.04),
               "tight/seed0": run("tight", "federated", 0.70, 0.0004),
               "central/seed0": run("central", "centralised", 0.71)}
    write_outputs(cfg, results, tmp_path, curves=False)
    md = (tmp_path / "t.md").read_text()
    assert "| fed | federated | 0.6100 ± 0.0100 (±0.0300 hist.) | 0.6000 ± 0.0000 |" in md
    assert "| tight | federated | 0.7000 | 0.6000 | 1 seed |" in md  # one seed: the value alone
    assert "| central | centralised | 0.7100 | 0.6000 | 1 seed |" in md
    assert "b bounds its distance from the exact AUC" in md
    with open(tmp_path / "t.csv") as handle:
        rows = {r["row"]: r for r in csv.DictReader(handle)}
    assert float(rows["fed"]["test auc bound"]) == pytest.approx(0.03)
    assert float(rows["tight"]["test auc bound"]) == pytest.approx(0.0004) and rows["central"]["test auc bound"] == ""
    assert not (tmp_path / "t_curves.png").exists()
    # no bound above 0.001: no note either
    write_outputs(cfg, {"tight/seed0": results["tight/seed0"]}, tmp_path, curves=False)
    assert "hist." not in (tmp_path / "t.md").read_text()


def test_metrics_of_an_extra_test_protocol_come_from_test_by_protocol(tmp_path):
    """``metrics = ["hr@10", "full/hr@10"]``: the second is read from the run's
    ``test_by_protocol["full"]`` (the ``also-test`` protocols); cross-domain names such as
    ``sport/hr@10`` stay in ``test``."""
    from fedrec.compare import test_metric, write_outputs

    run = {"row": "a", "kind": "centralised", "test": {"hr@10": 0.5, "sport/hr@10": 0.4},
           "test_by_protocol": {"sampled-99": {"hr@10": 0.5}, "full": {"hr@10": 0.06}}, "best_epoch": 3,
           "seconds": 1.0}
    assert test_metric(run, "full/hr@10") == 0.06 and test_metric(run, "sport/hr@10") == 0.4
    assert test_metric(run, "full/mrr") is None and test_metric(run, "other/hr@10") is None
    cfg = {"stem": "t", "title": "t", "data_display": "seq:x", "task": "next_item",
           "metrics": ["hr@10", "full/hr@10"], "runs": [{"name": "a", "kind": "centralised", "model": "sasrec"}]}
    write_outputs(cfg, {"a/seed0": run}, tmp_path, curves=False)
    assert "| a | centralised | 0.5000 | 0.0600 | 1 seed |" in (tmp_path / "t.md").read_text()


def test_rows_take_the_per_dataset_defaults_and_record_them(tmp_path):
    """What a row leaves out comes from fedrec.defaults (synthetic: fed_synthetic's
    eval-every 5 and patience 5) and is recorded; the row's own keys win."""
    path = tmp_path / "tiny.toml"
    path.write_text(CONFIG.replace('task = "ctr"\n', ""))  # the task too comes from the format
    cfg = load_comparison(path)
    results = run_comparison(cfg, seeds=[0], out_dir=tmp_path / "out")
    fed, central = results["fed/seed0"]["resolved"], results["central/seed0"]["resolved"]
    assert fed["defaults"] == {"task": "ctr", "eval-every": 5} and results["fed/seed0"]["config"]["eval-every"] == 5
    assert fed["options"]["rounds"] == 2 and fed["options"]["model.dim"] == 16
    assert central["defaults"] == {"task": "ctr", "patience": 5} and results["central/seed0"]["train"]["epochs"] == 2
    assert central["options"]["model.max-len"] == 20 == results["central/seed0"]["model_options"]["max-len"]


def test_recorded_comparisons_resolve_as_they_were_run():
    """Every row of the recorded comparison tables gives each key itself: no default takes
    effect, so their results (and resume fingerprints) stand."""
    from conftest import ROOT
    from fedrec.compare import _fingerprint, row_options

    configs = sorted((ROOT / "simulations" / "configs").glob("fed_*.toml"))
    assert configs
    for path in configs:
        cfg = load_comparison(path, data_root="/data")
        recorded = json.loads((ROOT / "simulations" / "results" / f"{path.stem}.json").read_text())
        for run in cfg["runs"]:
            assert row_options(cfg, run).defaults == {}, (path.name, run["name"])
            prints = {r["fingerprint"] for r in recorded.values() if r["row"] == run["name"] and "fingerprint" in r}
            assert prints <= {_fingerprint(cfg, run)}, (path.name, run["name"])


def test_a_centralised_row_takes_its_own_train_keys(tmp_path):
    """[runs.train] overrides [train] for that row only, and a model option there is refused."""
    from fedrec.compare import row_options

    path = tmp_path / "tiny.toml"
    path.write_text(CONFIG + '[runs.train]\nepochs = 3\nlr = 0.01\n')
    cfg = load_comparison(path)
    central = row_options(cfg, cfg["runs"][1]).options
    assert central["epochs"] == 3 and central["lr"] == 0.01 and central["model.dim"] == 16
    results = run_comparison(cfg, seeds=[0], out_dir=tmp_path / "out", only=["central"])
    assert results["central/seed0"]["train"]["epochs"] == 3 and results["central/seed0"]["train"]["lr"] == 0.01
    path.write_text(CONFIG + '[runs.train]\n"model.dim" = 8\n')
    with pytest.raises(ConfigError, match="has no option 'model.dim'"):
        row_options(load_comparison(path), load_comparison(path)["runs"][1])


def test_tables_give_the_time_per_epoch_and_result_files_are_readable(tmp_path):
    import os
    import stat

    path = tmp_path / "tiny.toml"
    path.write_text(CONFIG)
    cfg = load_comparison(path)
    results = run_comparison(cfg, seeds=[0], out_dir=tmp_path / "out", only=["central"])
    table = (tmp_path / "out" / "tiny.md").read_text()
    assert "| s / epoch or round |" in table
    run = results["central/seed0"]
    row = [line for line in table.splitlines() if line.startswith("| central |")][0]
    assert row.rstrip(" |").rsplit("| ", 1)[1] == f"{run['seconds'] / run['epochs_run']:.2f}"
    umask = os.umask(0)
    os.umask(umask)
    mode = stat.S_IMODE((tmp_path / "out" / "tiny.json").stat().st_mode)
    assert mode == 0o666 & ~umask
