"""simulations/fed_next_item.py: cells written as they finish, resumable, rendered table with
the published ML-1M numbers kept apart."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "simulations"))

import fed_next_item


def test_cells_resume_and_render(tmp_path, monkeypatch):
    out, states = tmp_path / "out", tmp_path / "states"
    args = ["--data", "tiny={data_root}", "--data-root", "synthetic:users=20,items=200,seed=2", "--datasets", "tiny",
            "--rows", "popularity", "fedmf", "pfedrec", "--rounds", "2", "--eval-every", "1",
            "--out-dir", str(out), "--state-dir", str(states)]
    assert fed_next_item.main(args) == 0
    cells = json.loads((out / "fed_next_item.json").read_text())
    assert set(cells) == {"tiny/popularity/seed0", "tiny/fedmf/seed0", "tiny/pfedrec/seed0"}
    fed = cells["tiny/pfedrec/seed0"]
    assert fed["data"] == "{data_root}" and fed["config"]["run"]["negatives"] == 4  # no machine path, protocol kept
    assert fed["config"]["run"]["rounds"] == 2 and fed["rounds_run"] == 2 and fed["seconds_per_round"] > 0
    assert fed["best_round"] in (1, 2) and 0 <= fed["test"]["hr@10"] <= 1
    assert (states / "tiny_fedmf_seed0.json").exists()
    table = (out / "fed_next_item.md").read_text()
    assert "| PFedRec | federated |" in table and "| popularity | centralised |" in table
    assert "Published, not ours" in table and "| PFedRec | 0.7326 | 0.4436 |" in table
    # a finished cell with the same configuration is not run again; another configuration is
    ran = []
    monkeypatch.setattr(fed_next_item, "run_cell", lambda config, *a: ran.append(config) or pytest.fail("re-ran"))
    assert fed_next_item.main(args) == 0 and not ran
    monkeypatch.undo()
    (out / "fed_next_item.json").unlink()  # the state dir alone also restores finished cells
    monkeypatch.setattr(fed_next_item, "run_cell", lambda config, *a: pytest.fail("re-ran"))
    assert fed_next_item.main(args) == 0
    assert len(json.loads((out / "fed_next_item.json").read_text())) == 3


def test_unknown_row_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        fed_next_item.main(["--rows", "fedprox", "--out-dir", str(tmp_path)])
    assert exc.value.code == 2 and "unknown row 'fedprox'" in capsys.readouterr().err
