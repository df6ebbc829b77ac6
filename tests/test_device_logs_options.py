"""Issue 18: devices, experiment logs and one way to set every option (through the CLI, as a
user types it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedrec.device import check_device_spec, resolve_device, to_cpu, to_device
from fedrec.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DATA = "synthetic:users=80,items=60,groups=2,min_len=6,max_len=10,seed=3"
TINY = ["--set", "model.dim=16", "--set", "model.layers=1", "--set", "model.max-len=8"]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``fedrec ARGS`` in a subprocess (stderr is a pipe, not a terminal, as under nohup)."""
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fedrec.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


def one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedrec: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- devices ---------------------------------------------------------------------------
def test_resolve_device_spellings():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else
                         "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
    assert resolve_device(None) == auto
    for bad in ("gpu", "cuda:x", "tpu", "cuda:", ""):
        with pytest.raises(ConfigError, match="device must be auto, cpu, cuda, cuda:N or mps"):
            check_device_spec(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_absent_gpu_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"device 'cuda' is not available.*available: cpu"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="not available"):
        resolve_device("cuda:1")


def test_to_device_and_back_keep_values():
    batch = {"items": torch.arange(6).reshape(2, 3), "maps": {"k": torch.ones(2)}, "n": 3}
    cpu = torch.device("cpu")
    assert to_device(batch, cpu) is batch  # a no-op on the CPU
    moved = to_device(batch, torch.device("meta"))  # another device: every tensor, nested ones too
    assert moved["items"].is_meta and moved["maps"]["k"].is_meta and moved["n"] == 3
    assert not batch["items"].is_meta  # the caller's batch is untouched
    tree = to_cpu({"a": [torch.zeros(2), (torch.ones(1),)], "b": 1})
    assert tree["b"] == 1 and torch.equal(tree["a"][1][0], torch.ones(1))


def test_model_moves_its_plain_tensor_attributes():
    """``.to()`` / ``.double()`` reach tensors a model keeps outside parameters and buffers
    (DimeRec's fixed start noise, feature code tables): what `--device` relies on."""
    from fedrec.data import load_dataset
    from fedrec.data.split import split_dataset
    from fedrec.models.base import ModelData
    from fedrec.models.registry import create_model

    split = split_dataset(load_dataset(DATA))
    model = create_model("dimerec", ModelData.from_split(split), {"dim": 16}, task="next_item")
    assert model._start_noise.dtype == torch.float32
    model.double()
    assert model._start_noise.dtype == torch.float64
    assert split.item_features is not None  # synthetic data has item attributes
    m = create_model("sasrec", ModelData.from_split(split), {"dim": 16, "item-repr": "both"}, task="ctr")
    m.double()  # feature code tables are plain attributes; they stay integer under .double()
    codes = [v for mod in m.modules() for v in vars(mod).values() if torch.is_tensor(v)]
    assert codes and all(not c.is_floating_point() for c in codes)
    m.to("meta")  # and they follow the model to another device
    moved = [v for mod in m.modules() for v in vars(mod).values() if torch.is_tensor(v)]
    assert len(moved) == len(codes) and all(c.is_meta for c in moved)


#: models whose forward reads data-dependent values (nonzero, .item(), a host-side cache),
#: which PyTorch's meta device cannot compute: they stop early there, never on a device mismatch
DATA_DEPENDENT = {"crm", "dimerec", "elastic", "kuaiformer", "marm", "moment_cross", "unicdr"}


def test_every_model_trains_and_scores_on_another_device():
    """Without a GPU, the "meta" device stands in for one: a model moved there, given a batch
    moved there, fails if anything in its forward, loss or scoring creates a tensor on the CPU
    ("expected all tensors to be on the same device"). Models that read data-dependent
    values cannot run on meta at all; for them only that a mismatch is not the reason is checked."""
    import dataclasses

    from fedrec.data import load_dataset
    from fedrec.data.batching import build_examples, iterate_batches
    from fedrec.data.samplers import UniformNegativeSampler
    from fedrec.data.split import split_dataset
    from fedrec.models.base import ModelData
    from fedrec.models.registry import MODELS, create_model

    small = {"dim": 16, "field-dim": 4, "layers": 2, "max-len": 8, "dropout": 0.1}
    base = "synthetic:users=40,items=60,groups=2,min_len=6,max_len=12,seed=1"
    data = {"single": split_dataset(load_dataset(base)),
            "domains": split_dataset(load_dataset(base + ",domains=2,overlap=0.5")),
            "rated": split_dataset(load_dataset(base + ",behaviours=2"))}
    meta, ran = torch.device("meta"), []
    for name in MODELS.names():
        spec = MODELS.create(name)
        for task in spec.model.tasks:
            sp = data["domains" if task == "cdr" or name == "moment_cross" else "rated" if name == "crm" else "single"]
            known = {f.name.replace("_", "-") for f in dataclasses.fields(spec.config)} if spec.config else set()
            model = create_model(name, ModelData.from_split(sp), {k: v for k, v in small.items() if k in known}
                                 if spec.config else None, task=task)
            if not getattr(model, "trainable", True):
                continue
            if hasattr(model, "prepare"):
                model.prepare(sp)
            sampler = UniformNegativeSampler(sp, seed=0)
            train_b = next(iterate_batches(build_examples(sp, task=task, stage="train", max_len=8), batch_size=8,
                                           num_negatives=0 if task == "ctr" else 2, sampler=sampler))
            test_b = next(iterate_batches(build_examples(sp, task=task, stage="test", max_len=8), batch_size=8))
            try:
                model.to(meta)
                batch = to_device(train_b, meta)
                loss = model.loss(batch, model(batch))
                assert loss.is_meta
                model.eval()
                scores = (model.predict_ctr(to_device(test_b, meta)) if task == "ctr"
                          else model.score_all(to_device(test_b, meta)))
                assert scores.is_meta
                ran.append(name)
            except (NotImplementedError, RuntimeError) as exc:
                message = str(exc).lower()
                assert "device" not in message or "meta tensor" in message, (name, task, str(exc)[:300])
                assert name in DATA_DEPENDENT, (name, task, str(exc)[:300])
    assert {"sasrec", "mrff", "bert4rec", "mf", "qarm"} <= set(ran)
    assert not DATA_DEPENDENT & set(ran), "a model now runs on meta: move it out of DATA_DEPENDENT"


def test_bad_device_on_every_command_is_one_line(tmp_path):
    bad = "device must be auto, cpu, cuda, cuda:N or mps"
    one_error_line(cli("train", "--model", "sasrec", "--data", DATA, "--device", "tpu"), bad, "'tpu'")
    one_error_line(cli("simulate", "--data", DATA, "--device", "gpu0", "--rounds", "1"), bad, "'gpu0'")
    one_error_line(cli("evaluate", str(tmp_path / "none.pt"), "--data", DATA, "--device", "x"), bad)
    one_error_line(cli("recommend", str(tmp_path / "none.pt"), "--data", DATA, "--out", str(tmp_path / "r.csv"),
                       "--device", "x"), bad)
    one_error_line(cli("inspect", "groups", "--data", DATA, "--device", "x"), bad)
    one_error_line(cli("compare", str(ROOT / "simulations" / "configs" / "fed_synthetic.toml"), "--device", "x",
                       "--out", str(tmp_path / "cmp")), bad)
    assert not (tmp_path / "cmp").exists()
    if not torch.cuda.is_available():
        one_error_line(cli("train", "--model", "sasrec", "--data", DATA, "--device", "cuda"), "not available")


# -- logs and options: one small run of each command -----------------------------------------
def test_train_log_dir_set_and_flags(tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "r.json"
    proc = cli("train", "--model", "sasrec", "--data", DATA, "--task", "next_item", "--epochs", "2",
               "--set", "lr=0.02", "--set", "train.patience=3", "--batch-size", "32", "--device", "cpu",
               "--log-dir", str(logs), "--out", str(out), *TINY)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["train"]["lr"] == 0.02 and result["train"]["patience"] == 3 and result["train"]["batch_size"] == 32
    assert result["device"] == "cpu"
    assert set(result["model_options"]) == {"dim", "layers", "max-len"}
    assert "log_dir" not in result["train"] and str(tmp_path) not in out.read_text()  # no machine paths
    lines = [json.loads(x) for x in (logs / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and all(x["kind"] == "epoch" for x in lines)
    assert [x["valid/ndcg@10"] for x in lines] == [h["valid"]["ndcg@10"] for h in result["history"]]
    assert json.loads((logs / "run.json").read_text())["model"] == "sasrec"
    # stderr is not a terminal: one logging line per epoch (the progress bar prints nothing there)
    epoch_lines = [ln for ln in proc.stderr.splitlines() if " fedrec epoch " in ln]
    assert len(epoch_lines) == 2 and "epoch 2/2" in epoch_lines[1] and "valid/ndcg@10=" in epoch_lines[1]
    # TensorBoard events hold the same numbers
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logs))
    acc.Reload()
    scalars = acc.Scalars("valid/ndcg@10")
    assert [s.step for s in scalars] == [1, 2]
    assert [round(s.value, 5) for s in scalars] == [round(x["valid/ndcg@10"], 5) for x in lines]


def test_set_prefixes_and_errors(tmp_path):
    # a bare key that is no training option stays a model option (as before); an unknown one is refused
    one_error_line(cli("train", "--model", "sasrec", "--data", DATA, "--set", "nonsense=1"),
                   "neither a training option", "nor an option of model 'sasrec'", "batch-size", "dropout")
    one_error_line(cli("train", "--model", "sasrec", "--data", DATA, "--set", "train.dim=16"),
                   "unknown training option 'dim'")
    one_error_line(cli("train", "--model", "sasrec", "--data", DATA, "--set", "lr=fast"), "lr")
    log_file = tmp_path / "file"
    log_file.write_text("x")
    one_error_line(cli("train", "--model", "sasrec", "--data", DATA, "--log-dir", str(log_file)),
                   "not a directory")
    one_error_line(cli("simulate", "--data", DATA, "--rounds", "1", "--batch-size", "8"), "--batch-size")
    one_error_line(cli("simulate", "--data", DATA, "--rounds", "1", "--set", "nonsense=1"), "nonsense")
    one_error_line(cli("simulate", "--data", DATA, "--rounds", "1", "--set", "train.dim=16"),
                   "unknown run-config key 'dim'")


def test_ambiguous_bare_key_asks_for_a_prefix(monkeypatch):
    from fedrec import cli as fcli

    monkeypatch.setattr(fcli, "_model_option_names", lambda model: {"dim", "lr"})
    with pytest.raises(ConfigError, match="write train.lr or model.lr"):
        fcli._train_assignments("sasrec", ["lr=0.1"])
    assert fcli._train_assignments("sasrec", ["train.lr=0.1", "model.lr=2", "dim=8", "split.method=files"]) == {
        "lr": 0.1, "model.lr": 2, "model.dim": 8, "split.method": "files"}  # typed as TOML values


@pytest.mark.slow
def test_simulate_and_compare_take_the_same_options(tmp_path, monkeypatch):
    if "FLWR_HOME" not in os.environ:
        monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    logs, out = tmp_path / "logs", tmp_path / "s.json"
    proc = cli("simulate", "--data", DATA, "--rounds", "2", "--lr", "0.05", "--set", "dim=16",
               "--set", "train.eval-every=1", "--device", "cpu", "--log-dir", str(logs), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["config"]["lr"] == 0.05 and result["config"]["device"] == "cpu"
    assert result["config"]["model.dim"] == 16 and "log-dir" not in result["config"]
    rounds = [json.loads(x) for x in (logs / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rounds] == [1, 2] and all(r["kind"] == "round" for r in rounds)
    assert rounds[-1]["valid/auc"] == pytest.approx(result["history"][-1]["valid"]["auc"])
    assert len([ln for ln in proc.stderr.splitlines() if " fedrec round " in ln]) == 2

    cfg = tmp_path / "cmp.toml"
    cfg.write_text(f'title = "t"\ndata = "{DATA}"\ntask = "ctr"\n[federated]\nrounds = 1\n[train]\nepochs = 1\n'
                   '[[runs]]\nname = "fed"\nkind = "federated"\nalgorithm = "mrff"\n'
                   '[[runs]]\nname = "central SASRec"\nkind = "centralised"\nmodel = "sasrec"\n')
    proc = cli("compare", "--config", str(cfg), "--seed", "0", "--set", "model.dim=16", "--lr", "0.01",
               "--device", "cpu", "--log-dir", str(tmp_path / "clogs"), "--out", str(tmp_path / "cmp"))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "cmp" / "cmp.json").read_text())
    assert results["fed/seed0"]["config"]["lr"] == 0.01
    assert results["central SASRec/seed0"]["train"]["lr"] == 0.01
    assert results["central SASRec/seed0"]["model_options"]["dim"] == 16
    assert (tmp_path / "clogs" / "fed" / "seed0" / "metrics.jsonl").exists()
    assert (tmp_path / "clogs" / "central_SASRec" / "seed0" / "metrics.jsonl").exists()
    one_error_line(cli("compare", str(cfg), "--config", str(cfg)), "once")
    one_error_line(cli("compare", str(cfg), "--set", "nonsense=1", "--out", str(tmp_path / "cmp")), "nonsense")
    one_error_line(cli("compare", str(cfg), "--set", "seed=3", "--out", str(tmp_path / "cmp")), "--seed")
    one_error_line(cli("compare", str(cfg), "--set", "log-dir=x", "--out", str(tmp_path / "cmp")), "--log-dir")


def test_check_device_script_on_the_cpu(tmp_path):
    """``simulations/check_device.py`` runs its three checks (here a self-check on the CPU)."""
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "simulations" / "check_device.py"), "cpu", "--models", "sasrec",
                           "mrff", "--epochs", "1", "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["all_ok"]
    assert {(r["model"], r["task"]) for r in report["models"]} == {("sasrec", "ctr"), ("sasrec", "next_item"),
                                                                   ("mrff", "ctr"), ("mrff", "next_item")}
    assert len(report["federated"]) == 4 and all(f["max_change"] > 0 for f in report["federated"])
    bad = subprocess.run([sys.executable, str(ROOT / "simulations" / "check_device.py"), "tpu"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "device must be" in bad.stderr and "Traceback" not in bad.stderr


def test_log_folder_and_checkpoint_are_not_recorded_and_ctr_refuses_topk(tmp_path):
    """`--set log-dir=...` (as the flag) and a checkpoint path stay out of the result JSON;
    `fedrec evaluate --topk` on a CTR model is refused, as `train` refuses it."""
    ck, out = tmp_path / "m.pt", tmp_path / "r.json"
    proc = cli("train", "--model", "sasrec", "--data", DATA, "--epochs", "1", "--set", f"log-dir={tmp_path / 'lg'}",
               "--checkpoint", str(ck), "--out", str(out), *TINY)
    assert proc.returncode == 0, proc.stderr
    assert str(tmp_path) not in out.read_text()
    assert (tmp_path / "lg" / "metrics.jsonl").exists()
    one_error_line(cli("evaluate", str(ck), "--data", DATA, "--topk", "5"), "--topk does not apply")


def test_compare_refuses_an_option_that_no_row_takes():
    """`fedrec compare --epochs 5` on a file of federated rows only would be ignored: refused."""
    from fedrec.compare import apply_overrides

    cfg = {"runs": [{"name": "fed", "kind": "federated", "algorithm": "mrff"}], "federated": {}}
    with pytest.raises(ConfigError, match="no row of this comparison takes 'epochs'.*federated"):
        apply_overrides(cfg, {"epochs": 5})
    with pytest.raises(ConfigError, match="takes 'batch-size'"):  # per-user engine: no minibatches
        apply_overrides(cfg, {"batch-size": 64})
    assert apply_overrides(cfg, {"rounds": 3})["runs"][0]["rounds"] == 3
    assert "rounds" not in cfg["runs"][0]  # the loaded comparison is not changed in place
