"""Per-dataset defaults (``fedrec/defaults.py``): one set read by ``fedrec train``,
``simulate`` and ``compare``; a bare train / simulate pair trains the same model; the user's
keys win; every run's JSON records the options in effect."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from fedrec.cli import _simulate_resolve, _train_resolve
from fedrec.config import build_config
from fedrec.data import load_dataset
from fedrec.data.split import split_dataset
from fedrec.defaults import FORMATS, defaults, resolve
from fedrec.errors import ConfigError
from fedrec.federated.spec import parse_run_config
from fedrec.models.base import ModelData
from fedrec.models.registry import MODELS, create_model
from fedrec.train import TrainConfig

BARE = ["kuaisar:/data/KuaiSAR-R", "movielens:/data/ml-100k/u.data", "seq:/data/s3rec/Beauty.txt",
        "pairs:/data/Video.txt", "synthetic:", "synthetic:users=600"]
#: model options that are a runtime's training objective, not the model's shape
OBJECTIVE = {"next-loss"}
TINY = "synthetic:users=24,items=40,seed=2"


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "fedrec.cli", *args], capture_output=True, text=True, timeout=600,
                          env=env, check=False)


@pytest.mark.parametrize("data", BARE)
@pytest.mark.parametrize("model,algorithm", [("mrff", "mrff"), ("sasrec", "fedavg")])
def test_bare_train_and_simulate_train_the_same_model(data, model, algorithm):
    trained, _ = _train_resolve(model, data, None, None)
    spec, simulated = _simulate_resolve(data, None, None, algorithm=algorithm)
    assert simulated.model == model

    def shape(opts):
        return {k: v for k, v in opts.items() if k not in OBJECTIVE}

    assert shape(trained.model_options()) == shape(simulated.model_options()) == shape(spec.model_options)
    assert trained.options.get("task") == simulated.options.get("task") == spec.task
    assert trained.options.get("protocol", "full") == spec.federated.protocol
    if spec.task == "next_item":  # full cross-entropy centrally; sampled negatives federated
        assert (trained.model_options()["next-loss"], spec.model_options["next-loss"]) == ("ce", "bce")
    else:
        assert trained.model_options() == spec.model_options
    if data.startswith("synthetic"):  # built on data: the very same parameters
        split = split_dataset(load_dataset(TINY))
        built = [create_model(model, ModelData.from_split(split), opts, task=spec.task)
                 for opts in (trained.model_options(), spec.model_options)]
        shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()} for m in built]
        assert shapes[0] == shapes[1]


def test_the_recorded_settings_are_the_defaults():
    """The values the issue asked for, as a bare command resolves them."""
    trained, _ = _train_resolve("mrff", "kuaisar:/d", None, None)
    spec, _ = _simulate_resolve("kuaisar:/d", None, None)
    assert trained.model_options() == spec.model_options == {"item-repr": "attributes"}
    sasrec, _ = _train_resolve("sasrec", "seq:/d/Beauty.txt", None, None)
    cfg = build_config(TrainConfig, {k: v for k, v in sasrec.options.items() if k != "task" and "." not in k})
    assert (cfg.epochs, cfg.patience, cfg.batch_size, cfg.lr, cfg.protocol) == (200, 20, 128, 0.001, "sampled-99")
    assert sasrec.model_options() == {"dim": 64, "heads": 2, "dropout": 0.5, "max-len": 50, "next-loss": "ce"}
    for data in ("seq:/d/Beauty.txt", "pairs:/d/Video.txt"):
        spec, _ = _simulate_resolve(data, None, None)
        fed = spec.federated
        assert (spec.task, fed.protocol, fed.fraction, fed.negatives, fed.rounds, spec.shards) == (
            "next_item", "sampled-99", 1.0, 4, 100, 1)


def test_defaults_set_only_options_the_model_accepts_and_build():
    """Every default of every format builds for every registered model: model options are
    fields of its config, budget keys of TrainConfig / the run config; the counting
    baselines get no model option and no budget."""
    for fmt in FORMATS:
        data = f"{fmt}:x"
        for name in MODELS.names():
            spec = MODELS.create(name)
            for runtime in ("centralised", "federated"):
                keys = defaults(data, runtime=runtime, model=name)
                opts = {k[len("model."):]: v for k, v in keys.items() if k.startswith("model.")}
                if spec.config is None:
                    assert opts == {} and set(keys) <= {"task", "protocol"}, (fmt, name, keys)
                    continue
                task = keys.get("task", "ctr")
                if task not in getattr(spec.model, "tasks", (task,)):
                    continue  # e.g. mf: next item only, never the default of a CTR format
                build_config(spec.config, opts, task=task, **dict(spec.fixed))
                if runtime == "centralised":
                    build_config(TrainConfig, {k: v for k, v in keys.items() if k != "task" and "." not in k})
                else:
                    parse_run_config(keys)
    assert "model.dim" not in defaults("seq:x", runtime="centralised", model="popularity")
    assert defaults("kuaisar:x", runtime="centralised", model="user_ctr") == {"task": "ctr"}
    assert defaults("parquet:x", runtime="federated", model="mrff") == {"task": "ctr"}
    # cross-domain files: UniCDR's protocol, one client per domain
    fed = defaults("cdr:x", runtime="federated", model="unicdr")
    assert fed["task"] == "cdr" and fed["partition"] == "domain" and fed["shards"] == 2
    # the domain partition is UniCDR's, not every algorithm's on these files
    assert "partition" not in defaults("cdr:x", runtime="federated", model="mrff")
    from fedrec.defaults import default_algorithm
    assert default_algorithm("cdr:x") == "unicdr" and default_algorithm("seq:x") == "mrff"
    # a bare `fedrec simulate --data cdr:DIR` runs UniCDR with one client per domain
    bare = resolve("cdr:x", runtime="federated", user={})
    assert bare.model == "unicdr" and bare.options["algorithm"] == "unicdr" and bare.options["partition"] == "domain"
    assert resolve("cdr:x", runtime="federated", user={"algorithm": "fedavg"}).options["algorithm"] == "fedavg"
    assert defaults("cdr:x", runtime="centralised", model="unicdr")["protocol"] == "sampled-999"
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        defaults("seq:x", runtime="centralised", model="nope")


def test_user_keys_win_and_are_told_apart(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[model]\nitem_repr = \"both\"\n[train]\nepochs = 3\nbatch_size = 32\n")
    resolved, _ = _train_resolve("mrff", "kuaisar:/d", cfg, ["dim=32"], epochs=2, seed=None)
    assert resolved.model_options() == {"item-repr": "both", "dim": 32}  # --set values are TOML scalars
    assert resolved.options["epochs"] == 2 and resolved.options["batch-size"] == 32
    assert resolved.options["patience"] == 5 and resolved.options["lr"] == 0.001  # the defaults not overridden
    assert resolved.defaults == {"task": "ctr", "patience": 5, "lr": 0.001}
    assert resolved.user == {"epochs": 2, "batch-size": 32, "model.item-repr": "both", "model.dim": 32}
    flat = resolve("seq:x", runtime="federated", user={"model-options": "next_loss=ce", "negatives": 1})
    assert flat.model_options()["next-loss"] == "ce" and flat.options["negatives"] == 1
    assert "negatives" not in flat.defaults and "model.next-loss" not in flat.defaults
    cfg.write_text("[train]\ntask = \"ctr\"\n")
    with pytest.raises(ConfigError, match=r"\[train\] has no option 'task'"):
        _train_resolve("mrff", "kuaisar:/d", cfg, None)


def test_train_json_records_the_options_in_effect(tmp_path):
    """A bare-but-for-speed train run: the recorded options are the defaults plus the user's,
    TrainConfig got them, and the model they build has the checkpoint's shapes."""
    out, ckpt = tmp_path / "r.json", tmp_path / "best.pt"
    done = _cli("train", "--model", "mrff", "--data", TINY, "--epochs", "1", "--set", "dim=16",
                "--set", "max-len=12", "--json", "--out", str(out), "--checkpoint", str(ckpt))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    rec = result["resolved"]
    assert rec["defaults"] == {"task": "ctr", "patience": 5}  # synthetic: fed_synthetic's [train]
    assert rec["user"]["epochs"] == 1 and rec["user"]["model.dim"] == 16
    assert result["train"]["patience"] == 5 and result["train"]["epochs"] == 1 and result["task"] == "ctr"
    options = {k[len("model."):]: v for k, v in rec["options"].items() if k.startswith("model.")}
    assert options == result["model_options"] == {"dim": 16, "max-len": 12}
    split = split_dataset(load_dataset(TINY))
    model = create_model(rec["model"], ModelData.from_split(split), options, task=rec["options"]["task"])
    saved = torch.load(ckpt, weights_only=False)["state"]
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in saved.items()}


def test_simulate_json_records_the_options_in_effect(tmp_path):
    out, model_dir = tmp_path / "r.json", tmp_path / "model"
    done = _cli("simulate", "--data", TINY, "--rounds", "1", "-n", "2", "--set", "model.dim=16",
                "--set", "model.max-len=12", "--set", f"model-dir={model_dir}", "--json", "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    rec = result["resolved"]
    assert rec["defaults"] == {"task": "ctr", "eval-every": 5}  # fed_synthetic's; rounds and shards are the user's
    assert rec["user"]["rounds"] == 1 and rec["user"]["shards"] == 2
    for key, value in rec["options"].items():  # what the run's own config says it used
        assert str(result["config"][key]) == str(value), key
    options = {k[len("model."):]: v for k, v in rec["options"].items() if k.startswith("model.")}
    split = split_dataset(load_dataset(TINY))
    model = create_model(rec["model"], ModelData.from_split(split), options, task=rec["options"]["task"])
    shapes = {k: tuple(v.shape) for k, v in model.named_parameters()}
    saved = torch.load(model_dir / "global.pt", weights_only=False)["global"]
    assert saved and all(tuple(v.shape) == shapes[k] for k, v in saved.items())


def test_defaults_command_prints_what_train_and_simulate_use():
    done = _cli("defaults", "kuaisar:/nowhere/KuaiSAR-R", "--json")
    assert done.returncode == 0, done.stderr
    both = json.loads(done.stdout)
    assert both["train"]["options"]["model.item-repr"] == both["simulate"]["options"]["model.item-repr"] == "attributes"
    assert both["train"]["options"]["epochs"] == 40 and both["simulate"]["options"]["rounds"] == 60
    table = _cli("defaults", "seq:/nowhere/Beauty.txt", "--model", "sasrec")
    assert table.returncode == 0, table.stderr
    assert "model.next-loss = ce  (default)" in table.stdout and "negatives = 4  (default)" in table.stdout
    for args, needle in [(["--model", "nope"], "unknown model 'nope'"),
                         (["--model", "popularity", "--set", "dim=8"], "takes no options"),
                         (["--set", "dim=wide"], "must be of type int")]:
        bad = _cli("defaults", "seq:/x", *args)
        assert bad.returncode == 2 and needle in bad.stderr and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_every_format_with_defaults_names_its_recorded_runs():
    from conftest import ROOT

    for name, entry in FORMATS.items():
        for run in entry.recorded:
            assert (ROOT / "simulations" / "configs" / f"{run}.toml").is_file(), (name, run)
        assert dataclasses.is_dataclass(entry)


def test_a_federation_folder_takes_the_defaults_of_its_source(tmp_path):
    from fedrec.data.federation import write_federation

    folder = tmp_path / "fed"
    write_federation(TINY, folder, clients=2)
    spec, resolved = _simulate_resolve(None, None, None, folder)
    # the source's format (synthetic) gives task and budget; the folder fixes clients and population
    assert resolved.defaults == {"task": "ctr", "rounds": 40, "eval-every": 5}
    assert spec.shards == 2 and spec.federated.population == 24 and spec.federated.rounds == 40
    assert resolved.options["federation"] == str(folder.resolve()) and "federation" not in resolved.user
