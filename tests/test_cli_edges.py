"""Rough edges a new user met (issue 18, item 5), each checked where the user meets it:
through the CLI (a subprocess: exit code 2, one ``fedrec: error:`` line on stderr, no
traceback, no partial output) and, where a library function decides, there too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedrec.data import load_dataset
from fedrec.data.interactions import Dataset, Interactions
from fedrec.data.split import split_dataset
from fedrec.errors import ConfigError
from fedrec.train import TrainConfig, train

TINY = {"dim": 8, "field-dim": 4, "layers": 1, "max-len": 6, "dropout": 0.0}
SYNTH = "synthetic:users=30,items=40,groups=2,min_len=6,max_len=9,seed=1"


def fedrec_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``fedrec ARGS`` in a subprocess of this interpreter (a wide console)."""
    env = {**os.environ, "COLUMNS": "200", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    return subprocess.run([sys.executable, "-m", "fedrec.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=cwd)


def one_error_line(run: subprocess.CompletedProcess) -> str:
    """The single ``fedrec: error:`` line of a refused command (checked: exit 2, nothing on
    stdout, no traceback)."""
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedrec: error: "), run.stderr
    assert run.stdout == ""
    return lines[0]


@pytest.fixture(scope="module")
def implicit(tmp_path_factory) -> Path:
    """A ``seq:`` file (implicit feedback: no labels): 8 users, 6 items each."""
    path = tmp_path_factory.mktemp("seq") / "seq.txt"
    rng = np.random.default_rng(0)
    path.write_text("".join(f"{u} " + " ".join(map(str, rng.choice(np.arange(1, 21), 6, replace=False))) + "\n"
                            for u in range(1, 9)))
    return path


# -- 1. ctr on data without labels is refused before anything trains -----------------------

def test_train_ctr_on_implicit_data_is_refused_before_training(implicit, tmp_path):
    out = tmp_path / "result.json"
    line = one_error_line(fedrec_cli("train", "--model", "sasrec", "--data", f"seq:{implicit}", "--task", "ctr",
                                     "--epochs", "1", "--out", str(out)))
    assert "task 'ctr' needs 0/1 click labels" in line
    for hint in ("--task next_item", "label column", "ctr_negatives=K"):
        assert hint in line
    assert not out.exists()


def test_library_train_refuses_ctr_without_labels_before_the_first_epoch(implicit):
    split = split_dataset(load_dataset(f"seq:{implicit}"))
    epochs = []
    with pytest.raises(ConfigError, match="needs 0/1 click labels"):
        train("sasrec", split, task="ctr", model_options=TINY, config=TrainConfig(epochs=1, progress=False),
              on_epoch=epochs.append)
    assert epochs == []
    # the same data trains as next item
    result = train("sasrec", split, task="next_item", model_options=TINY, config=TrainConfig(epochs=1, progress=False))
    assert result["test"]["ndcg@10"] is not None


def test_simulate_ctr_on_implicit_data_is_refused_up_front(implicit, tmp_path):
    out = tmp_path / "result.json"
    line = one_error_line(fedrec_cli("simulate", "--data", f"seq:{implicit}", "--task", "ctr", "--rounds", "1",
                                     "--clients", "2", "--out", str(out)))
    assert "task 'ctr' needs 0/1 click labels" in line and "--task next_item" in line
    assert not out.exists()


def test_ctr_with_one_class_in_the_held_out_rows_is_refused_before_training():
    # labelled data whose held-out (last two) impressions of every user are clicks
    users = np.repeat(np.arange(1, 7), 6)
    labels = np.tile([0, 1, 0, 1, 1, 1], 6)
    frame = pd.DataFrame({"user": users, "item": np.arange(len(users)) % 11 + 1, "time": np.tile(np.arange(6), 6),
                          "label": labels})
    split = split_dataset(Dataset("t", Interactions.from_frame(frame, source="t")))
    epochs = []
    with pytest.raises(ConfigError, match="every valid impression has label 1, so AUC is undefined"):
        train("sasrec", split, task="ctr", model_options=TINY, config=TrainConfig(epochs=1, progress=False),
              on_epoch=epochs.append)
    assert epochs == []


# -- 2./3. saved models: a model without groups, another split ------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A SASRec and an MRFF checkpoint of one epoch on :data:`SYNTH`."""
    folder = tmp_path_factory.mktemp("saved")
    split = split_dataset(load_dataset(SYNTH))
    out = {}
    for name in ("sasrec", "mrff"):
        out[name] = folder / f"{name}.pt"
        train(name, split, task="ctr", model_options=TINY, data_name=SYNTH,
              config=TrainConfig(epochs=1, progress=False, checkpoint=str(out[name])))
    return out


def test_inspect_groups_with_a_model_without_groups_says_so(saved, tmp_path):
    line = one_error_line(fedrec_cli("inspect", "groups", "--checkpoint", str(saved["sasrec"]),
                                     "--out", str(tmp_path / "g")))
    assert f"{saved['sasrec']}: holds a sasrec model, which has no groups to inspect" in line
    assert "models with groups: mrff" in line
    assert not (tmp_path / "g").exists()


def test_inspect_groups_on_other_data_names_the_difference(saved, tmp_path):
    # no --data: the default synthetic data is not the checkpoint's (was: a tensor-size traceback)
    line = one_error_line(fedrec_cli("inspect", "groups", "--checkpoint", str(saved["mrff"]),
                                     "--out", str(tmp_path / "g")))
    assert "trained on another split (users 30 (saved) vs 2,000 (this data)" in line
    assert f"its data was '{SYNTH}'" in line and "--data" in line
    run = fedrec_cli("inspect", "groups", "--checkpoint", str(saved["mrff"]), "--data", SYNTH, "--json",
                     "--out", str(tmp_path / "g"))
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "g" / "groups.json").is_file()


def test_evaluate_on_another_split_says_what_differs_in_words(saved):
    other = SYNTH.replace("users=30", "users=31")
    line = one_error_line(fedrec_cli("evaluate", str(saved["sasrec"]), "--data", other))
    assert "trained on another split (users 30 (saved) vs 31 (this data)" in line
    assert "train/valid/test rows" in line and "(saved) vs" in line
    assert "{" not in line and "n_users" not in line  # no internal fingerprint dictionaries


def test_resume_of_another_run_names_the_differing_option(tmp_path):
    split = split_dataset(load_dataset(SYNTH))
    state = tmp_path / "run.pt"
    cfg = TrainConfig(epochs=1, progress=False, resume=str(state))
    train("sasrec", split, task="ctr", model_options=TINY, config=cfg)
    with pytest.raises(ConfigError, match=r"written by another run \(model_options 'dim' 8 \(saved\) vs 16 "
                                          r"\(this run\)\)$"):
        train("sasrec", split, task="ctr", model_options={**TINY, "dim": 16}, config=cfg)
    other = split_dataset(load_dataset(SYNTH.replace("users=30", "users=31")))
    with pytest.raises(ConfigError, match=r"written by another run \(split: users 30 \(saved\) vs 31 \(this data\)"):
        train("sasrec", other, task="ctr", model_options=TINY, config=cfg)


# -- 4. a csv with another delimiter than sep ---------------------------------------------

HEADER_ROWS = [("user", "item", "rating", "time"), ("196", "242", "3", "881250949"), ("186", "302", "3", "891717742")]


@pytest.mark.parametrize("char, spelled, what", [("\t", "tab", "tabs"), (";", ";", "';'"), ("|", "|", "'|'"),
                                                 (" ", "space", "spaces")])
def test_csv_with_another_delimiter_says_which_sep_to_add(tmp_path, char, spelled, what):
    from fedrec.errors import DataError

    path = tmp_path / "logs.csv"
    path.write_text("".join(char.join(row) + "\n" for row in HEADER_ROWS))
    spec = f"csv:{path}?user=user&item=item&time=time"
    with pytest.raises(DataError, match=f"the header line holds {re.escape(what)}: add sep={re.escape(spelled)} "
                                        "to the spec$"):
        load_dataset(spec)
    assert len(load_dataset(f"{spec}&sep={spelled}").interactions) == 2  # the hint works


def test_csv_with_tabs_hints_through_the_cli_and_shows_tabs_as_backslash_t(tmp_path):
    path = tmp_path / "u.csv"
    path.write_text("".join("\t".join(row) + "\n" for row in HEADER_ROWS))
    line = one_error_line(fedrec_cli("data", "describe", f"csv:{path}?user=user&item=item"))
    assert "(the file has: user\\titem\\trating\\ttime); the header line holds tabs: add sep=tab to the spec" in line
    assert "\t" not in line
    # without a mapping (canonical column names expected) the same hint
    line = one_error_line(fedrec_cli("data", "describe", f"csv:{path}"))
    assert line.endswith("the header line holds tabs: add sep=tab to the spec")
    run = fedrec_cli("data", "describe", f"csv:{path}?sep=\\t", "--json")  # sep=\t is accepted too
    assert run.returncode == 0, run.stderr


def test_no_delimiter_hint_for_a_plain_missing_column(tmp_path):
    from fedrec.errors import DataError

    path = tmp_path / "logs.csv"
    path.write_text("user id,item\n1,2\n")  # a space inside a column name is no delimiter
    with pytest.raises(DataError, match=r"no such column for 'user' \(the file has: user id, item\)$"):
        load_dataset(f"csv:{path}?user=user&item=item")


# -- 5. --help shows brackets and back-quotes as written ------------------------------------

def _commands():
    """Every (path, click command) of the ``fedrec`` app, groups included."""
    import click
    import typer

    from fedrec.cli import app

    out = []

    def walk(cmd, path):
        out.append((path, cmd))
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return out


def _written(cmd) -> str:
    """The help texts of a command as written in the source (escapes undone)."""
    texts = [cmd.help or "", cmd.epilog or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
    return "\n".join(texts).replace("\\[", "[")


@pytest.mark.parametrize("path, cmd", [pytest.param(p, c, id=" ".join(p) or "fedrec") for p, c in _commands()])
def test_help_shows_brackets_literally_and_no_rst_quotes(path, cmd):
    from typer.testing import CliRunner

    from fedrec.cli import app

    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    shown = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())  # boxes and wrapping undone
    assert "``" not in shown and "\\[" not in shown
    for token in re.findall(r"\[[a-z][\w.]*\]", _written(cmd)):
        assert token in shown, f"{' '.join(path)} --help lost {token}"


def test_the_help_of_train_simulate_and_evaluate_shows_their_tables():
    from typer.testing import CliRunner

    from fedrec.cli import app

    runner = CliRunner()
    shown = {name: " ".join(re.sub(r"[│╭╮╰╯─]", " ", runner.invoke(app, [name, "--help"], env={"COLUMNS": "250"})
                                    .output).split()) for name in ("train", "simulate", "evaluate")}
    assert "TOML file with [model], [train] and [split] tables." in shown["train"]
    assert "an optional [model] table" in shown["simulate"] and "[tool.flwr.app]" in shown["simulate"]
    assert "`test.epsilon`" in shown["simulate"]
    assert "whose [split] table" in shown["evaluate"]


def test_help_text_is_idempotent_and_converts_rst_literals():
    from fedrec.cli import help_text

    once = help_text("TOML file with [model] tables; ``x`` and \\[split]")
    assert once == "TOML file with \\[model] tables; `x` and \\[split]"
    assert help_text(once) == once


# -- 6. fedrec models: each line describes its own model and cites its paper -----------------

def test_models_lines_are_distinct_and_cite_each_models_paper():
    from fedrec.models.registry import MODELS

    run = fedrec_cli("models")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == MODELS.names()
    described = {}
    for line in lines:
        name, rest = line.split(None, 1)
        tasks, description = re.fullmatch(r"tasks: (.+?)  +(.+)", rest).groups()
        assert tasks == ", ".join(MODELS.create(name).model.tasks)
        described[name] = description
    assert len(set(described.values())) == len(described), "two models share a description"
    assert not described["bert4rec-last"].startswith("SASRec") and "BERT4Rec" in described["bert4rec-last"]
    for name, description in described.items():
        doc = sys.modules[MODELS.create(name).model.__module__].__doc__
        if name == "bert4rec-last":  # the SASRec class with BERT4Rec's encoder
            doc = sys.modules["fedrec.models.bert4rec"].__doc__
        if re.search(r'"[^"]{10,}"', doc):  # the module cites a paper: the line names it
            cited = re.search(r"\((\w+)[^()]*?(\d{4})[^()]*\)$", description)
            assert cited, f"{name}: no paper in {description!r}"
            author, year = cited.groups()
            assert author in doc and year in doc, f"{name}: {cited.group(0)} is not the paper its module cites"


# -- 7. result files get the mode open() would give, not mkstemp's 0600 ---------------------

def test_train_result_and_checkpoint_are_0644_under_umask_022_with_typed_options(tmp_path):
    out, ckpt = tmp_path / "deep" / "result.json", tmp_path / "best.pt"
    env = {**os.environ, "COLUMNS": "200"}
    run = subprocess.run([sys.executable, "-m", "fedrec.cli", "train", "--model", "sasrec", "--data", SYNTH, "--epochs",
                          "1", "--set", "dim=8", "--set", "max-len=6", "--out", str(out), "--checkpoint", str(ckpt),
                          "--json"], capture_output=True, text=True, timeout=120, env=env,
                         preexec_fn=lambda: os.umask(0o022))
    assert run.returncode == 0, run.stderr
    assert out.stat().st_mode & 0o777 == 0o644
    assert ckpt.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in out.parent.iterdir()] == ["result.json"]  # no temporary file left
    # 8. --set values are recorded typed (the int 8, not "8"), in the result and the checkpoint
    import json

    import torch

    result = json.loads(out.read_text())
    assert result["model_options"] == {"dim": 8, "max-len": 6}
    assert result["resolved"]["user"]["model.dim"] == 8
    assert torch.load(ckpt, weights_only=False)["model_options"] == {"dim": 8, "max-len": 6}


def test_atomic_writes_follow_the_umask_keep_an_existing_mode_and_leave_nothing_on_failure(tmp_path):
    from fedrec.files import atomic_path, new_file_mode, umask, write_json_atomic, write_text_atomic

    old = os.umask(0o027)
    try:
        assert umask() == 0o027 and new_file_mode() == 0o640
        fresh = write_json_atomic({"a": 1}, tmp_path / "r.json")
        assert fresh.stat().st_mode & 0o777 == 0o640 and fresh.read_text() == '{\n "a": 1\n}'
        kept = tmp_path / "kept.md"
        kept.write_text("old")
        kept.chmod(0o600)  # open() keeps an existing file's mode: so does the atomic write
        write_text_atomic(kept, "new")
        assert kept.read_text() == "new" and kept.stat().st_mode & 0o777 == 0o600
        with pytest.raises(RuntimeError):
            with atomic_path(kept) as tmp:
                tmp.write_text("half")
                raise RuntimeError("killed mid-write")
        assert kept.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["kept.md", "r.json"]
        private = write_text_atomic(tmp_path / "p.txt", "x", mode=0o600)
        assert private.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_compare_outputs_and_federated_checkpoints_modes(tmp_path):
    import torch

    from fedrec.compare import write_outputs
    from fedrec.federated.checkpoint import save_client, save_server

    old = os.umask(0o022)
    try:
        cfg = {"stem": "t", "title": "t", "data_display": "synthetic:", "task": "ctr", "runs": [{"name": "a"}]}
        results = {"a/seed0": {"row": "a", "kind": "centralised", "seed": 0, "test": {"auc": 0.7, "logloss": 0.6},
                               "best_epoch": 2, "epochs_run": 3, "seconds": 3.0,
                               "curve": {"x": "epoch", "points": [[1, 0.6], [2, 0.7], [3, 0.65]]}}}
        write_outputs(cfg, results, tmp_path)
        for name in ("t.md", "t.csv", "t_curves.png"):
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
        server = save_server(tmp_path / "ck", round=1, global_params={"w": torch.zeros(2)},
                             group_counts=torch.zeros(1), history={})
        client = save_client(tmp_path / "ck", shard=0, round=1, state={"w": torch.zeros(2)})
        assert server.stat().st_mode & 0o777 == 0o644
        assert client.stat().st_mode & 0o777 == 0o600  # a client's private parameters stay its owner's
    finally:
        os.umask(old)


# -- 8. --set values are TOML scalars; recorded runs still match -----------------------------

def test_set_values_are_toml_scalars_and_fields_keep_their_types():
    from fedrec.config import build_config, parse_assignments
    from fedrec.federated.spec import parse_run_config
    from fedrec.models.kuaiformer import KuaiFormerConfig
    from fedrec.models.mf import MFConfig

    given = parse_assignments(["groups=2", "lr=1e-3", "user-bias=true", "item-repr=id", "name=\"7\"", "ids=007"])
    assert given == {"groups": 2, "lr": 0.001, "user-bias": True, "item-repr": "id", "name": "7", "ids": "007"}
    assert type(given["groups"]) is int and type(given["lr"]) is float
    # a string option given a number takes its text; a boolean one accepts 0 / 1 as before
    assert build_config(KuaiFormerConfig, parse_assignments(["windows=8"])).windows == "8"
    assert build_config(MFConfig, parse_assignments(["user-bias=1", "item-bias=0"])).user_bias is True
    with pytest.raises(ConfigError, match="option 'dim' must be of type int"):
        build_config(MFConfig, parse_assignments(["dim=2.5"]))
    # the Flower run config's model-options string reads its values the same way
    assert parse_run_config({"model-options": "groups=2,item-repr=id"}).model_options == {"groups": 2, "item-repr": "id"}


def test_a_training_state_recorded_with_string_options_still_resumes(tmp_path):
    split = split_dataset(load_dataset(SYNTH))
    state = tmp_path / "run.pt"
    cfg = TrainConfig(epochs=1, progress=False, resume=str(state))
    as_strings = {k: str(v) for k, v in TINY.items()}  # how --set recorded options before they were typed
    first = train("sasrec", split, task="ctr", model_options=as_strings, config=cfg)
    again = train("sasrec", split, task="ctr", model_options=TINY, config=cfg)  # typed: the same run
    assert again["test"] == first["test"] and again["epochs_run"] == 1
    with pytest.raises(ConfigError, match="written by another run \\(model_options 'dim'"):
        train("sasrec", split, task="ctr", model_options={**TINY, "dim": 16}, config=cfg)


# -- 9./10. fedrec compare: curves are the mean over seeds; one seed prints no ± -----------

def _run(row, seed, kind, auc, points):
    return {"row": row, "kind": kind, "seed": seed, "test": {"auc": auc, "logloss": 0.6}, "best_epoch": 2,
            "best_round": 2, "epochs_run": 3, "rounds": 3, "seconds": 3.0,
            "curve": {"x": "round" if kind == "federated" else "epoch", "points": points}}


CMP = {"stem": "t", "title": "t", "data_display": "synthetic:", "task": "ctr",
       "runs": [{"name": "fed"}, {"name": "cen"}]}


def test_curves_plot_the_mean_over_seeds_with_a_min_max_band_and_integer_ticks():
    import matplotlib.pyplot as plt

    from fedrec.compare import curve_figure, curve_stats

    results = {"fed/seed0": _run("fed", 0, "federated", 0.7, [[1, 0.5], [2, 0.7], [3, None]]),
               "fed/seed1": _run("fed", 1, "federated", 0.8, [[1, 0.7], [2, 0.9], [3, 0.8]]),
               "cen/seed0": _run("cen", 0, "centralised", 0.6, [[1, 0.55], [2, 0.6]])}
    stats = curve_stats(results)
    assert stats["fed"]["x"] == [1, 2, 3] and stats["fed"]["seeds"] == 2
    assert stats["fed"]["mean"] == pytest.approx([0.6, 0.8, 0.8])  # round 3: only seed 1 has a value
    assert stats["fed"]["min"] == pytest.approx([0.5, 0.7, 0.8]) and stats["fed"]["max"] == pytest.approx([0.7, 0.9, 0.8])
    fig = curve_figure(CMP, results)
    try:
        fed_ax, cen_ax = fig.axes[:2]
        (line,) = fed_ax.lines
        assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == pytest.approx([0.6, 0.8, 0.8])
        assert "mean of 2 seeds" in line.get_label()
        assert len(fed_ax.collections) == 1  # the min-max band
        band = fed_ax.collections[0].get_paths()[0].vertices
        assert band[:, 1].min() == pytest.approx(0.5) and band[:, 1].max() == pytest.approx(0.9)
        assert list(cen_ax.lines[0].get_ydata()) == pytest.approx([0.55, 0.6]) and not cen_ax.collections
        for ax in (fed_ax, cen_ax):
            fig.canvas.draw()
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
    finally:
        plt.close(fig)


def test_tables_print_one_seed_without_plus_minus_and_several_with_it(tmp_path):
    from fedrec.compare import mean_cell, seeds_cell, write_outputs

    results = {"fed/seed0": _run("fed", 0, "federated", 0.7, [[1, 0.5]]),
               "fed/seed1": _run("fed", 1, "federated", 0.8, [[1, 0.6]]),
               "cen/seed0": _run("cen", 0, "centralised", 0.6, [[1, 0.55]])}
    write_outputs(CMP, results, tmp_path, curves=False)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("| fed") or
            line.startswith("| cen")}
    assert rows["fed"][1:4] == ["0.7500 ± 0.0500", "0.6000 ± 0.0000", "2"]  # several seeds: as before
    assert rows["cen"][1:4] == ["0.6000", "0.6000", "1 seed"]
    assert "±" not in " ".join(rows["cen"])
    assert (mean_cell([]), mean_cell([0.5]), mean_cell([0.5, 0.7])) == ("-", "0.5000", "0.6000 ± 0.1000")
    assert (seeds_cell(1), seeds_cell(3)) == ("1 seed", "3")


def test_run_table_renders_one_seed_without_plus_minus():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "simulations"))
    from run_table import markdown

    runs = {"a/seed0": {"row": "a", "test": {"hr@10": 0.5}, "best_epoch": 3},
            "b/seed0": {"row": "b", "test": {"hr@10": 0.4}, "best_epoch": 2},
            "b/seed1": {"row": "b", "test": {"hr@10": 0.6}, "best_epoch": 4}}
    lines = markdown(runs, ["hr@10"], "### t").splitlines()
    assert "| a | 0.5000 | 1 seed | 3 |" in lines and "| b | 0.5000 ± 0.1000 | 2 | 2, 4 |" in lines
