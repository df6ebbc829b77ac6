"""``fedrec launch`` refuses a bad run config before anything is submitted (no SuperLink
started, nothing in ``$FLWR_HOME``), and reports a failed run's reason in one line
(the run itself: ``tests/federated/test_flwr_run.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrec.cli import app
from fedrec.launch import check_run_config, failure_reason

ROOT = Path(__file__).resolve().parents[1]


def _launch_cases(tmp: Path):
    return [
        ("run config item without a value", ["--run-config", "rounds="], ["cannot read 'rounds='", "KEY=VALUE"]),
        ("run config word without '='", ["--run-config", "rounds=3 fast"], ["cannot read 'fast'"]),
        ("run config not TOML", ["--run-config", 'data="a b" shards=x'], ["--run-config", "invalid format"]),
        ("run config key the app does not declare", ["--run-config", "nope=1"], ["unknown key 'nope'", "node-wait"]),
        ("run config bad value", ["--run-config", 'task="foo"'], ["'task' must be ctr, next_item or cdr"]),
        ("run config of the wrong type", ["--run-config", "rounds=1.5"], ["'rounds'", "type int"]),
        ("run config file missing", ["--run-config", str(tmp / "nope.toml")], ["nope.toml", "No such file"]),
        ("log is a folder", ["--log", str(tmp)], ["--log", "is a folder"]),
        ("negative timeout", ["--timeout", "-1"], ["--timeout", ">= 0"]),
    ]


@pytest.mark.parametrize("index", range(len(_launch_cases(Path("/x")))), ids=[c[0] for c in _launch_cases(Path("/x"))])
def test_a_bad_launch_is_one_line_and_submits_nothing(tmp_path, monkeypatch, index):
    name, argv, words = _launch_cases(tmp_path)[index]
    home = tmp_path / "flwr-home"
    home.mkdir()
    monkeypatch.setenv("FLWR_HOME", str(home))
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(app, ["launch", "--app", str(ROOT), *argv])
    assert result.exit_code == 2, (name, result.output)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedrec: error: "), (name, result.stderr)
    assert all(w in lines[0] for w in words), (name, lines[0])
    assert result.stdout == "" and "Traceback" not in result.output
    assert list(home.iterdir()) == []  # no SuperLink started, no config written


def test_the_run_config_check_gives_the_spec_flower_would_give():
    spec = check_run_config(ROOT, 'rounds=3 model-options="dim=16" node-wait=30')
    assert spec.federated.rounds == 3 and spec.model_options == {"dim": 16} and spec.node_wait == 30.0
    assert check_run_config(ROOT).federated.rounds == 20  # the app's own defaults


@pytest.mark.parametrize("details, reason", [
    ("ServerApp failed with exception: run config 'shards' is 3, but this Flower simulation has 2 SuperNode(s)",
     "run config 'shards' is 3, but this Flower simulation has 2 SuperNode(s)"),
    ("Simulation failed with exception: only 1 of 2 nodes\nconnected", "only 1 of 2 nodes connected"),
    ("", ""),
])
def test_failure_reason_is_the_exceptions_text_in_one_line(details, reason):
    assert failure_reason(details) == reason
