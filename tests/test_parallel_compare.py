"""simulations/parallel_compare.py: (row, seed) pairs of a comparison run as parallel
processes, merged into the one results file; resumable; a deadline leaves nothing partial."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "simulations"))

import parallel_compare  # noqa: E402

from fedrec.compare import _fingerprint, load_comparison  # noqa: E402

CONFIG = '''
title = "tiny"
data = "synthetic:users=30,items=60,groups=2,min_len=6,max_len=10,seed=3"
task = "next_item"

[train]
epochs = 1
batch-size = 16

[[runs]]
name = "popularity"
kind = "centralised"
model = "popularity"

[[runs]]
name = "SASRec"
kind = "centralised"
model = "sasrec"
[runs.options]
dim = 8
max-len = 6
'''


def test_pairs_run_in_parallel_merge_resume_and_deadline(tmp_path, capsys):
    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(CONFIG)
    out = tmp_path / "out"
    assert parallel_compare.main([str(cfg_path), "--seed", "0", "--workers", "2", "--out", str(out)]) == 0
    results = json.loads((out / "tiny.json").read_text())
    cfg = load_comparison(cfg_path)
    assert sorted(results) == ["SASRec/seed0", "popularity/seed0"]
    for run in cfg["runs"]:  # recorded under the fingerprint `fedrec compare` itself would give
        assert results[f"{run['name']}/seed0"]["fingerprint"] == _fingerprint(cfg, run)
    lines = (out / "tiny.json").read_text().splitlines()  # one (row, seed) per line
    assert len(lines) == len(results) + 2 and lines[0] == "{" and lines[-1] == "}"
    assert (out / "tiny.md").is_file() and (out / "tiny.csv").is_file()
    assert "SASRec" in (out / "tiny.md").read_text()
    assert (parallel_compare.pair_dir(out, "tiny", "SASRec", 0) / "log.txt").is_file()

    # a rerun finds nothing to do and leaves the file as it was
    before = (out / "tiny.json").read_text()
    assert parallel_compare.main([str(cfg_path), "--seed", "0", "--out", str(out)]) == 0
    assert "0 (row, seed) pairs to run" in capsys.readouterr().out
    assert (out / "tiny.json").read_text() == before

    # a deadline stops what runs: nothing partial is merged, and the exit status says so
    assert parallel_compare.main([str(cfg_path), "--seed", "1", "--only", "SASRec", "--deadline", "0.2",
                                  "--out", str(out)]) == 1
    assert "stopped" in capsys.readouterr().out
    assert "SASRec/seed1" not in json.loads((out / "tiny.json").read_text())

    # a pair recorded under another configuration is not merged
    part = parallel_compare.pair_dir(out, "tiny", "SASRec", 7)
    part.mkdir(parents=True)
    stale = dict(results["SASRec/seed0"], seed=7, fingerprint="0000000000000000")
    (part / "tiny.json").write_text(json.dumps({"SASRec/seed7": stale}))
    assert parallel_compare.main([str(cfg_path), "--merge-only", "--out", str(out)]) == 0
    assert "SASRec/seed7" not in json.loads((out / "tiny.json").read_text())


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(CONFIG)
    assert parallel_compare.main([str(cfg_path), "--only", "nope", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no run named nope" in err and len(err.strip().splitlines()) == 1


def test_sigterm_stops_the_pair_processes(tmp_path):
    """Stopping the runner (SIGTERM, as `kill PID` sends) leaves no pair process running."""
    import signal
    import subprocess
    import time

    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(CONFIG)
    out = tmp_path / "out"
    runner = subprocess.Popen([sys.executable, str(ROOT / "simulations" / "parallel_compare.py"), str(cfg_path),
                               "--seed", "0", "--only", "SASRec", "--set", "epochs=100000", "--out", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = parallel_compare.pair_dir(out, "tiny", "SASRec", 0) / "log.txt"
    deadline = time.monotonic() + 60
    while not log.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert log.exists(), "the pair never started"

    def pairs() -> list[str]:
        found = subprocess.run(["pgrep", "-f", str(out / ".parallel")], capture_output=True, text=True)
        return found.stdout.split()

    assert pairs(), "the pair process is not running"
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=30) != 0
    assert pairs() == []
    assert not (out / "tiny.json").exists()  # nothing partial merged
