"""Issue 19, item 1: bad input is refused before any work, in one line naming the option,
file or value, with exit code 2, no traceback, and nothing written or changed (each case a
class of bad input, through the CLI as a user types it).

Classes covered (one case each in :func:`cases` unless said; ``grep -c '^        ("' `` on
this file counts the CLI cases):

=====================  ==============================================================
values                 non-finite numbers (train lr inf/nan, a model option nan,
                       simulate lr / noise-multiplier / target-epsilon inf); negative
                       weight decay, seeds (train, eval, simulate, partition, compare,
                       dp-noise-seed below -1); --clients 0 (simulate, partition); a
                       fraction selecting nobody or above 1; rounds 0; epochs 0; a
                       negative model option; delta >= 1; max-grad-norm 0; node-wait 0;
                       min-nodes above shards; central-dp without noise; secure
                       aggregation with central DP; resume without checkpoint-dir;
                       --topk 0, not numbers, on a ctr run; an unknown task, partition,
                       protocol, algorithm, model, data format, spec option, device
config                 a folder or a binary file as --config; a TOML syntax error; an
                       unknown run-config key; --set without '='; a --set key given
                       twice; --batch-size for a one-user-per-client algorithm
outputs                --out / --checkpoint a folder; --out / --resume / run-config out
                       under a file; checkpoint-dir / model-dir a file; --log-dir a
                       file; partition / compare --out a file
inputs                 an empty server checkpoint; a truncated global model; a text
                       file as a checkpoint; a missing checkpoint; a folder that is no
                       model; a missing data file; a malformed pairs: and seq: line;
                       ctr data without a positive label (one dataset; a federation:
                       :func:`test_ctr_over_a_federation_without_positive_labels_stops_at_its_first_evaluation`);
                       task cdr on one-domain data; more clients than users; a missing
                       comparison file; an unknown partition scheme
federation folders     no manifest; a manifest that is no JSON; a missing client file;
                       a catalogue that is not the folder's; --federation with --data;
                       --clients other than the folder's
model folders          recommend --users with an id no client holds; --k 0; an
                       unknown output suffix; --node-config malformed, with an unknown
                       key, naming a missing file, for a centralised model
resume identity        another seed, model option, data spec, fewer rounds
                       (:func:`test_a_resume_of_another_run_is_refused`); the same data
                       name with other contents, one dataset and a federation folder
flwr run / launch      ``tests/test_launch.py`` (a malformed, unknown or bad run config, an
                       unwritable --log, before anything is submitted) and
                       ``tests/federated/test_flwr_run.py`` (shards above the
                       simulation's SuperNodes; a node's missing data file)
=====================  ==============================================================
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrec.cli import app

D = "synthetic:users=60,items=40"


def cases(tmp: Path):
    """(id, argv, words the one error line must hold); ``tmp`` is the :func:`playground`."""
    f, folder, binary = tmp / "file.txt", tmp / "folder", tmp / "binary.toml"
    fed, fm = tmp / "fed", tmp / "fedmodel"
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
        # -- federation folders
        ("federation without a manifest", ["simulate", "--federation", str(tmp / "fed-nomanifest"), "--rounds", "1"],
         ["not a federation folder", "manifest.json"]),
        ("federation manifest not json", ["simulate", "--federation", str(tmp / "fed-badmanifest"), "--rounds", "1"],
         ["manifest.json", "cannot read the manifest"]),
        ("federation client file missing", ["simulate", "--federation", str(tmp / "fed-noclient"), "--rounds", "1"],
         ["client-1.parquet", "not found"]),
        ("federation with another catalogue", ["simulate", "--federation", str(tmp / "fed-othercat"), "--rounds", "1"],
         ["catalogue.parquet", "not the catalogue this federation folder was written with"]),
        ("federation and data", ["simulate", "--federation", str(fed), "--data", D, "--rounds", "1"],
         ["--data or --federation"]),
        ("clients other than the federation's", ["simulate", "--federation", str(fed), "--clients", "3"],
         ["--clients 3", "has 2 clients"]),
        # -- model folders and checkpoints
        ("evaluate a folder that is no model", ["evaluate", str(folder)], ["not a federated model folder"]),
        ("evaluate a text file as a checkpoint", ["evaluate", str(f), "--data", D], ["file.txt", "not a readable"]),
        ("evaluate a missing checkpoint", ["evaluate", str(tmp / "nope.pt"), "--data", D], ["nope.pt", "not found"]),
        ("recommend users nobody holds", ["recommend", str(fm), "--users", str(tmp / "users.txt"),
                                          "--out", str(tmp / "r.csv")], ["users.txt", "99999", "none of the clients"]),
        ("recommend k 0", ["recommend", str(fm), "--k", "0", "--out", str(tmp / "r.csv")], ["positive", "0"]),
        ("recommend unknown output suffix", ["recommend", str(fm), "--out", str(tmp / "r.xyz")], ["'.xyz'", ".csv"]),
        ("node-config without '='", ["recommend", str(fm), "--node-config", "data", "--out", str(tmp / "r.csv")],
         ["--node-config expects KEY=VALUE"]),
        ("node-config unknown key", ["recommend", str(fm), "--node-config", "catalog=x", "--out", str(tmp / "r.csv")],
         ["node config: unknown key 'catalog'", "catalogue"]),
        ("node-config naming a missing file", ["evaluate", str(fm), "--node-config", f"data=seq:{tmp / 'nope.txt'}"],
         ["nope.txt", "not found"]),
        ("node-config for a centralised model", ["evaluate", str(tmp / "sas.pt"), "--data", D, "--node-config",
                                                  "data=x"], ["--node-config apply to a federated model folder"]),
        # -- data
        ("pairs line without an item", ["simulate", "--data", f"pairs:{tmp / 'pairs.txt'}", "--task", "next_item",
                                        "--rounds", "1"], ["pairs.txt, line 3", "'item'"]),
        ("seq line with a non-integer item", ["train", "--model", "sasrec", "--data", f"seq:{tmp / 'seq.txt'}",
                                              "--task", "next_item"], ["seq.txt, line 2", "'x'"]),
        ("unknown data format", ["simulate", "--data", "foo:bar"], ["unknown data format 'foo'", "synthetic"]),
        ("unknown data spec option", ["data", "describe", "synthetic:users=10,bogus=3"], ["bogus"]),
        ("missing data file", ["data", "describe", f"seq:{tmp / 'nope.txt'}"], ["nope.txt", "not found"]),
        ("ctr data without a positive label", ["simulate", "--data", f"csv:{tmp / 'nolabels.csv'}", "--task", "ctr",
                                               "--clients", "2"], ["every valid impression has label 0", "AUC"]),
        ("cdr task on one-domain data", [*sim, "--task", "cdr"], ["'cdr' needs multi-domain data"]),
        ("more clients than users", ["simulate", "--data", "synthetic:users=10,items=40", "--clients", "50"],
         ["50", "number of users (10)"]),
        ("unknown partition scheme", ["data", "partition", D, "--clients", "2", "--partition", "foo",
                                      "--out", str(tmp / "p")], ["--partition", "'foo'"]),
        ("missing comparison file", ["compare", str(tmp / "nope.toml"), "--out", str(tmp / "cmp")],
         ["nope.toml", "not found"]),
        # -- configuration
        ("toml syntax error", [*tr, "--config", str(tmp / "bad.toml")], ["bad.toml", "not valid TOML"]),
        ("set given twice", [*sim, "--set", "lr=0.1", "--set", "lr=0.2"], ["--set lr is given twice", "lr=0.2"]),
        ("set without equals", [*sim, "--set", "lr"], ["--set expects KEY=VALUE", "'lr'"]),
        ("unknown run-config key", [*sim, "--set", "bogus-key=1"], ["unknown key 'bogus-key'"]),
        ("unknown algorithm", [*sim, "--algorithm", "nope"], ["unknown algorithm 'nope'", "mrff"]),
        ("unknown model", ["train", "--model", "nope", "--data", D], ["unknown model 'nope'", "sasrec"]),
        ("topk 0", [*sim, "--task", "next_item", "--topk", "0"], ["topk", "positive integer"]),
        ("topk not numbers", [*tr, "--task", "next_item", "--topk", "a,b"], ["topk", "'a'"]),
        ("topk on a ctr run", [*sim, "--topk", "10"], ["topk applies to the ranking tasks"]),
        ("rounds 0", ["simulate", "--data", D, "--rounds", "0"], ["'rounds' must be >= 1"]),
        ("epochs 0", ["train", "--model", "sasrec", "--data", D, "--epochs", "0"], ["'epochs' must be >= 1"]),
        ("unknown partition", [*sim, "--set", "partition=foo"], ["'partition'", "'foo'"]),
        ("unknown protocol", [*sim, "--task", "next_item", "--set", "protocol=foo"], ["'protocol'", "'foo'"]),
        ("delta not below 1", [*sim, "--noise-multiplier", "1", "--delta", "2"], ["'delta' must be < 1"]),
        ("max-grad-norm 0", [*sim, "--noise-multiplier", "1", "--max-grad-norm", "0"], ["max_grad_norm", "> 0"]),
        ("fraction above 1", [*sim, "--set", "fraction=2"], ["'fraction' must be in (0, 1]"]),
        ("negative model option", [*sim, "--set", "model.dim=-1"], ["'dim'", "positive"]),
        ("central dp without noise", [*sim, "--set", "central-dp=true"], ["central-noise-multiplier"]),
        ("min-nodes above shards", [*sim, "--clients", "2", "--set", "min-nodes=3"], ["'min-nodes' (3)", "'shards' (2)"]),
        ("node-wait 0", [*sim, "--set", "node-wait=0"], ["'node-wait' must be > 0"]),
        ("device not on this machine", [*sim, "--device", "cuda:7"], ["'cuda:7' is not available"]),
        ("unknown task", [*tr, "--task", "foo"], ["--task", "'foo'"]),
        ("log-dir is a file", [*sim, "--log-dir", str(f)], ["--log-dir", "file.txt"]),
        ("batch-size for one user per client", [*sim, "--batch-size", "32"], ["--batch-size applies to silo"]),
        ("resume without checkpoint-dir", [*sim, "--set", "resume=true"], ["need 'checkpoint-dir'"]),
        ("secure aggregation with central dp", [*sim, "--set", "secure-aggregation=true", "--set", "central-dp=true",
                                                "--set", "central-noise-multiplier=1"], ["cannot be combined"]),
    ]


@pytest.fixture(scope="module")
def playground(tmp_path_factory):
    """A file, a folder, a binary file, a zero-byte checkpoint, a truncated model; a
    federated model folder and a centralised checkpoint of one round/epoch; a federation
    folder and broken copies of it; malformed data and config files."""
    import shutil

    from fedrec.data.federation import write_federation

    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "file.txt").write_text("keep me\n")
    (tmp / "folder").mkdir()
    (tmp / "binary.toml").write_bytes(bytes(range(256)) * 4)
    (tmp / "ck").mkdir()
    (tmp / "ck" / "server.pt").write_bytes(b"")
    (tmp / "model").mkdir()
    (tmp / "model" / "global.pt").write_bytes(b"PK\x03\x04 truncated")
    (tmp / "bad.toml").write_text("lr = [1,\n")
    (tmp / "pairs.txt").write_text("1 2\n1 3\n2\n")
    (tmp / "seq.txt").write_text("1 2 3 4\n2 x 5 6\n")
    (tmp / "users.txt").write_text("1\n99999\n")
    (tmp / "nolabels.csv").write_text("user,item,time,label\n" + "".join(f"{u},{i},{i},0\n" for u in range(1, 9)
                                                                        for i in range(1, 7)))
    for argv in (["simulate", "--data", D, "--rounds", "1", "--set", "model.dim=8", "--set", f"model-dir={tmp / 'fedmodel'}"],
                 ["train", "--model", "sasrec", "--data", D, "--epochs", "1", "--set", "dim=8",
                  "--checkpoint", str(tmp / "sas.pt")]):
        assert CliRunner().invoke(app, argv).exit_code == 0, argv
    write_federation(D, tmp / "fed", clients=2)
    write_federation("synthetic:users=60,items=50,seed=3", tmp / "fed2", clients=2)
    for name in ("fed-nomanifest", "fed-badmanifest", "fed-noclient", "fed-othercat"):
        shutil.copytree(tmp / "fed", tmp / name)
    (tmp / "fed-nomanifest" / "manifest.json").unlink()
    (tmp / "fed-badmanifest" / "manifest.json").write_text("{not json")
    (tmp / "fed-noclient" / "client-1.parquet").unlink()
    shutil.copy(tmp / "fed2" / "catalogue.parquet", tmp / "fed-othercat" / "catalogue.parquet")
    return tmp


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("index", range(len(cases(Path("/x")))), ids=[c[0] for c in cases(Path("/x"))])
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
    assert not (playground / "r.csv").exists() and not (playground / "r.xyz").exists()


def test_the_cases_are_distinct_and_at_least_60():
    ids = [c[0] for c in cases(Path("/x"))]
    assert len(ids) == len(set(ids)) and len({tuple(c[1]) for c in cases(Path("/x"))}) == len(ids)
    assert len(ids) >= 60


def test_ctr_over_a_federation_without_positive_labels_stops_at_its_first_evaluation(playground, tmp_path,
                                                                                     monkeypatch):
    """A federation's held-out labels are the nodes' own: the server finds one class only
    at the first evaluation and stops there, one line, no result written."""
    from fedrec.data.federation import write_federation

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    write_federation(f"csv:{playground / 'nolabels.csv'}", tmp_path / "fed", clients=2)
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["simulate", "--federation", str(tmp_path / "fed"), "--task", "ctr", "--rounds",
                                      "3", "--out", str(out)])
    assert result.exit_code == 2, result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("fedrec: error: ")]
    assert len(errors) == 1 and "valid impressions of all nodes have one label only" in errors[0]
    assert "Traceback" not in result.output and not out.exists()


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
        ([*(a.replace("model.dim=16", "model.dim=32") for a in base), "--rounds", "3", "--set", "resume=true"],
         ["another run", "model.dim"]),
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


def _resume_refused(argv: list[str], ck: Path, words: list[str]) -> str:
    before = (ck / "server.pt").read_bytes()
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, (argv, result.output)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedrec: error: resume: ") and "Traceback" not in result.output
    assert all(w in lines[0] for w in words), lines[0]
    assert (ck / "server.pt").read_bytes() == before  # the checkpoint is untouched
    return lines[0]


def test_a_resume_over_changed_data_under_the_same_name_is_refused(tmp_path, monkeypatch):
    """A federated resume's identity holds the nodes' data fingerprints: the same options
    over a data file with other contents (same path) are refused naming the client and its
    data; over the unchanged file the run resumes, to the numbers of an uninterrupted run."""
    import json

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    rng = __import__("numpy").random.default_rng(0)
    data = tmp_path / "pairs.txt"
    text = "".join(f"{u} {i}\n" for u in range(1, 41) for i in rng.choice(range(1, 151), 8, replace=False))
    data.write_text(text)
    ck = tmp_path / "ck"
    base = ["simulate", "--data", f"pairs:{data}", "--task", "next_item", "--clients", "2", "--set", "model.dim=8",
            "--set", f"checkpoint-dir={ck}", "--set", "checkpoint-every=1", "--json"]
    first = CliRunner().invoke(app, [*base, "--rounds", "2"])
    assert first.exit_code == 0, first.output
    lines = text.splitlines()
    lines[4] = lines[4].split()[0] + " 149"  # user 1's fifth item: another one, same users and sizes
    data.write_text("\n".join(lines) + "\n")
    _resume_refused([*base, "--rounds", "3", "--set", "resume=true"], ck,
                    ["client 0's data", f"pairs:{data}", "not what the checkpoint was trained on", "fingerprint"])
    data.write_text(text)  # the data it was trained on: resumes
    again = CliRunner().invoke(app, [*base, "--rounds", "3", "--set", "resume=true"])
    assert again.exit_code == 0, again.output
    straight = CliRunner().invoke(app, [*base[:9], "--json", "--rounds", "3"])  # no checkpoints
    assert straight.exit_code == 0, straight.output
    resumed, whole = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (again, straight))
    assert [{k: r.get(k) for k in ("round", "valid", "test")} for r in resumed["history"]] == \
        [{k: r.get(k) for k in ("round", "valid", "test")} for r in whole["history"]]


def test_a_resume_over_a_federation_folder_whose_client_file_changed_is_refused(tmp_path, monkeypatch):
    """The same over a federation folder: client 1's file rewritten with one row fewer."""
    import pandas as pd

    from fedrec.data.federation import write_federation

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    fed = tmp_path / "fed"
    write_federation(D, fed, clients=2)
    ck = tmp_path / "ck"
    base = ["simulate", "--federation", str(fed), "--set", "model.dim=8", "--set", f"checkpoint-dir={ck}",
            "--set", "checkpoint-every=1"]
    assert CliRunner().invoke(app, [*base, "--rounds", "1"]).exit_code == 0
    frame = pd.read_parquet(fed / "client-1.parquet")
    frame.iloc[:-1].to_parquet(fed / "client-1.parquet")
    _resume_refused([*base, "--rounds", "2", "--set", "resume=true"], ck,
                    ["client 1's data", "client-1.parquet", "not what the checkpoint was trained on"])
