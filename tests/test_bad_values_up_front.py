"""Issue 19, item 1 (a first part): bad values and unwritable outputs are refused before any
work, in one line naming the option or file, with exit code 2, no traceback, and nothing
written or changed (each case a class of bad input, through the CLI as a user types it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrec.cli import app

D = "synthetic:users=60,items=40"


def cases(tmp: Path):
    """(id, argv, words the one error line must hold); ``tmp`` holds a file, a folder, a
    binary file and a zero-byte checkpoint folder."""
    f, folder, binary = tmp / "file.txt", tmp / "folder", tmp / "binary.toml"
    ck = tmp / "ck"
    model = tmp / "model"
    tr = ["train", "--model", "sasrec", "--data", D, "--epochs", "1"]
    sim = ["simulate", "--data", D, "--rounds", "1"]
    return [
        ("train lr inf", [*tr, "--set", "lr=inf"], ["'lr'", "finite"]),
        ("train lr nan", [*tr, "--lr", "nan"], ["'lr'", "finite"]),
        ("train model option nan", [*tr, "--set", "model.dropout=nan"], ["'dropout'", "finite"]),
        ("train negative weight decay", [*tr, "--set", "weight-decay=-0.1"], ["weight-decay", ">= 0"]),
        ("train negative seed", [*tr, "--seed", "-1"], ["'seed'", ">= 0"]),
        ("train negative eval seed", [*tr, "--set", "eval-seed=-5"], ["eval-seed", ">= 0"]),
        ("config is a folder", [*tr, "--config", str(folder)], ["is a folder"]),
        ("config is binary", [*tr, "--config", str(binary)], ["not a text file"]),
        ("out is a folder", [*tr, "--out", str(folder)], ["--out", "is a folder"]),
        ("out under a file", [*tr, "--out", str(f / "r.json")], ["--out", "is not a folder"]),
        ("checkpoint is a folder", [*tr, "--checkpoint", str(folder)], ["--checkpoint", "is a folder"]),
        ("resume under a file", [*tr, "--resume", str(f / "state.pt")], ["--resume", "is not a folder"]),
        ("simulate lr inf", [*sim, "--set", "lr=inf"], ["'lr'", "finite"]),
        ("simulate noise multiplier inf", [*sim, "--noise-multiplier", "inf"], ["noise-multiplier", "finite"]),
        ("simulate target epsilon inf", [*sim, "--target-epsilon", "inf"], ["target-epsilon", "finite"]),
        ("simulate negative seed", [*sim, "--seed", "-1"], ["'seed'", ">= 0"]),
        ("simulate zero clients", [*sim, "--clients", "0"], ["--clients", ">= 1"]),
        ("simulate out is a folder", [*sim, "--out", str(folder)], ["--out", "is a folder"]),
        ("simulate run-config out under a file", [*sim, "--set", f"out={f / 'r.json'}"], ["'out'", "is not a folder"]),
        ("simulate checkpoint-dir is a file", [*sim, "--set", f"checkpoint-dir={f}", "--set", "checkpoint-every=1"],
         ["checkpoint-dir", "not a folder"]),
        ("simulate model-dir is a file", [*sim, "--set", f"model-dir={f}"], ["model-dir", "not a folder"]),
        ("simulate negative partition seed", [*sim, "--set", "partition-seed=-2"], ["partition-seed", ">= 0"]),
        ("simulate dp noise seed below -1", [*sim, "--set", "dp-noise-seed=-2"], ["dp-noise-seed"]),
        ("simulate fraction selecting nobody", [*sim, "--set", "fraction=0.001"], ["'fraction' 0.001", "of the 60 users"]),
        ("partition zero clients", ["data", "partition", D, "--clients", "0", "--out", str(tmp / "p")],
         ["--clients", ">= 1"]),
        ("partition negative seed", ["data", "partition", D, "--clients", "2", "--seed", "-3", "--out", str(tmp / "p")],
         ["--seed", ">= 0"]),
        ("partition out is a file", ["data", "partition", D, "--clients", "2", "--out", str(f)], ["--out"]),
        ("evaluate out is a folder", ["evaluate", str(model), "--out", str(folder)], ["--out", "is a folder"]),
        ("compare out is a file", ["compare", "simulations/configs/fed_synthetic.toml", "--out", str(f)],
         ["--out", "not a folder"]),
        ("compare negative seed", ["compare", "simulations/configs/fed_synthetic.toml", "--seed", "-1",
                                   "--out", str(tmp / "cmp")], ["--seed", ">= 0"]),
        ("resume from an empty server checkpoint", [*sim, "--set", f"checkpoint-dir={ck}", "--set", "resume=true"],
         ["server.pt", "empty"]),
        ("evaluate a truncated global model", ["evaluate", str(model)], ["global.pt", "not a readable"]),
    ]


@pytest.fixture(scope="module")
def playground(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "file.txt").write_text("keep me\n")
    (tmp / "folder").mkdir()
    (tmp / "binary.toml").write_bytes(bytes(range(256)) * 4)
    (tmp / "ck").mkdir()
    (tmp / "ck" / "server.pt").write_bytes(b"")
    (tmp / "model").mkdir()
    (tmp / "model" / "global.pt").write_bytes(b"PK\x03\x04 truncated")
    return tmp


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("index", range(32), ids=[c[0] for c in cases(Path("/x"))])
def test_bad_input_is_one_line_before_any_work(playground, index, monkeypatch):
    name, argv, words = cases(playground)[index]
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    before = _snapshot(playground)
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, (name, result.exit_code, result.output, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedrec: error: "), (name, result.stderr)
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], (name, lines[0])
    assert _snapshot(playground) == before, f"{name}: a file was written or changed"
    assert not (playground / "p").exists() and not (playground / "cmp").exists()


def test_the_run_configs_own_out_is_written(tmp_path, monkeypatch):
    """`--set out=FILE` (the run config's key) writes the result there, as a deployment does."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    out = tmp_path / "sub" / "r.json"
    result = CliRunner().invoke(app, ["simulate", "--data", D, "--rounds", "1", "--set", f"out={out}"])
    assert result.exit_code == 0, result.output
    import json

    assert json.loads(out.read_text())["rounds"] == 1


def test_a_resume_of_another_run_is_refused(tmp_path, monkeypatch):
    """A federated resume must come from the same run: another seed, model option or data is
    refused naming the key; fewer rounds than the checkpoint trained is refused; the same
    run (more rounds) resumes."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    ck = tmp_path / "ck"
    base = ["simulate", "--data", D, "--set", "model.dim=16", "--set", f"checkpoint-dir={ck}",
            "--set", "checkpoint-every=1"]
    first = CliRunner().invoke(app, [*base, "--rounds", "2"])
    assert first.exit_code == 0, first.output
    server = (ck / "server.pt").read_bytes()
    for argv, words in (
        ([*base, "--rounds", "3", "--seed", "1", "--set", "resume=true"], ["another run", "seed = 0 there, 1 here"]),
        ([*base, "--rounds", "3", "--set", "model.dim=32", "--set", "resume=true"], ["another run", "model.dim"]),
        (["simulate", "--data", "synthetic:users=61,items=40", *base[3:], "--rounds", "3", "--set", "resume=true"],
         ["another run", "data"]),
        ([*base, "--rounds", "1", "--set", "resume=true"], ["trained 2 rounds", "more than this run's rounds (1)"]),
    ):
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 2, (argv, result.output)
        line = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(line) == 1 and all(w in line[0] for w in words), (argv, result.stderr)
        assert (ck / "server.pt").read_bytes() == server  # the checkpoint is untouched
    again = CliRunner().invoke(app, [*base, "--rounds", "3", "--set", "resume=true", "--json"])
    assert again.exit_code == 0, again.output


def test_a_resume_with_another_patience_stops_as_that_patience_says(tmp_path, monkeypatch):
    """`patience` may change on a resume, and then counts: a run stopped early by patience 1
    continues to its rounds when resumed with patience 0 (never stop)."""
    import json

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    ck = tmp_path / "ck"
    base = ["simulate", "--data", D, "--set", "model.dim=16", "--set", f"checkpoint-dir={ck}",
            "--set", "checkpoint-every=1", "--set", "eval-every=1", "--json"]
    first = CliRunner().invoke(app, [*base, "--rounds", "4", "--set", "patience=1"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(app, [*base, "--rounds", "5", "--set", "patience=0", "--set", "resume=true"])
    assert again.exit_code == 0, again.output
    stopped_at = json.loads(first.stdout.strip().splitlines()[-1])["rounds"]
    result = json.loads(again.stdout.strip().splitlines()[-1])
    assert [r["round"] for r in result["history"] if "train" in r] == [1, 2, 3, 4, 5], (stopped_at, result["history"])
    assert stopped_at < 4  # patience 1 did stop the first run early on this data (else the test shows nothing)
