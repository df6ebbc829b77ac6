"""The centralised trainer and ``fedrec train``: model selection on validation, test at the
best validation epoch, checkpoints, and the baselines on real data."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import write_negatives
from fedrec.data import load_dataset
from fedrec.data.batching import build_examples, iterate_batches
from fedrec.data.split import split_dataset
from fedrec.errors import ConfigError, DataError
from fedrec.models.base import ModelData
from fedrec.models.registry import create_model
from fedrec.train import TrainConfig, evaluate, train

SPEC = "synthetic:users=60,items=80,groups=2,min_len=8,max_len=14,seed=2"
#: enough items for sampled-99's 99 distinct unseen negatives per user
WIDE = "synthetic:users=40,items=200,groups=2,min_len=8,max_len=12,seed=4"
SMALL = {"dim": 16, "field-dim": 4, "layers": 1, "max-len": 10, "dropout": 0.0}


@pytest.fixture(scope="module")
def split():
    return split_dataset(load_dataset(SPEC))


@pytest.fixture(scope="module")
def wide():
    return split_dataset(load_dataset(WIDE))


def test_test_metrics_are_those_of_the_best_validation_epoch(split, tmp_path):
    ckpt = tmp_path / "best.pt"
    cfg = TrainConfig(epochs=4, batch_size=16, patience=10, progress=False, checkpoint=str(ckpt))
    result = train("mrff", split, task="ctr", model_options=SMALL, config=cfg)
    aucs = [h["valid"]["auc"] for h in result["history"]]
    assert result["best_epoch"] == 1 + aucs.index(max(aucs))
    assert result["valid"] == result["history"][result["best_epoch"] - 1]["valid"]
    # re-evaluate the returned best weights on test: the same numbers
    model = create_model("mrff", ModelData.from_split(split), SMALL, task="ctr")
    model.load_state_dict(result["model_state"])
    test = build_examples(split, task="ctr", stage="test", max_len=10)
    assert evaluate(model, test, task="ctr") == result["test"]
    saved = torch.load(ckpt, weights_only=False)
    assert saved["epoch"] == result["best_epoch"] and saved["model"] == "mrff"


def test_early_stopping_stops_after_patience(split):
    cfg = TrainConfig(epochs=30, batch_size=16, patience=0, lr=0.5, progress=False)
    result = train("sasrec", split, task="ctr", model_options=SMALL, config=cfg)
    assert result["epochs_run"] <= result["best_epoch"] + 1  # patience 0: stop at the first non-improvement


class _Stop(Exception):
    pass


def _stop_after(epoch):
    def hook(record):
        if record["epoch"] == epoch:
            raise _Stop

    return hook


@pytest.mark.parametrize("extra,stop", [({"epochs": 5, "patience": 10}, 2),
                                        # early stopping fires at epoch 10 (best 8, patience 1): the
                                        # resumed run must carry the stale counter over to stop there
                                        ({"epochs": 12, "patience": 1, "lr": 0.01}, 10)])
def test_interrupted_run_resumes_to_the_uninterrupted_result(wide, tmp_path, extra, stop):
    """Next item with sampled negatives and dropout (so the sampler's and torch's RNG
    states matter): interrupted during epoch ``stop`` (the hook runs before that epoch's
    state is written), resumed from the state file, the run ends with the same history, best
    epoch, test metrics and weights as one uninterrupted run."""
    opts = {**SMALL, "dropout": 0.3}
    cfg = {"batch_size": 16, "progress": False, "protocol": "sampled-99", "negatives": 2, **extra}
    whole = train("sasrec", wide, task="next_item", model_options=opts, config=TrainConfig(**cfg))
    assert stop <= whole["epochs_run"]
    if extra["patience"] == 1:
        assert whole["epochs_run"] < extra["epochs"]  # early stopping did fire
    state = tmp_path / "run.pt"
    with pytest.raises(_Stop):
        train("sasrec", wide, task="next_item", model_options=opts, config=TrainConfig(**cfg, resume=str(state)),
              on_epoch=_stop_after(stop))
    assert torch.load(state, weights_only=False)["epoch"] == stop - 1
    seen = []
    resumed = train("sasrec", wide, task="next_item", model_options=opts, config=TrainConfig(**cfg, resume=str(state)),
                    on_epoch=lambda r: seen.append(r["epoch"]))
    assert seen == list(range(stop, whole["epochs_run"] + 1))  # earlier epochs were not trained again
    assert resumed["history"] == whole["history"]
    assert resumed["test"] == whole["test"] and resumed["best_epoch"] == whole["best_epoch"]
    assert all(torch.equal(resumed["model_state"][k], whole["model_state"][k]) for k in whole["model_state"])
    # a finished state gives its result again without training
    again = train("sasrec", wide, task="next_item", model_options=opts, config=TrainConfig(**cfg, resume=str(state)),
                  on_epoch=_stop_after(1))
    assert again["test"] == whole["test"] and again["epochs_run"] == whole["epochs_run"]


@pytest.mark.parametrize("short,long", [({"epochs": 3, "patience": 10}, {"epochs": 6, "patience": 10}),
                                        ({"epochs": 12, "patience": 0, "lr": 0.01}, {"epochs": 12, "patience": 3, "lr": 0.01})])
def test_a_finished_run_continues_with_a_larger_budget(wide, tmp_path, short, long):
    """A state that finished at its epoch cap or on patience, resumed with more epochs or
    patience, ends as a run that had the larger budget from the start."""
    opts = {**SMALL, "dropout": 0.3}
    cfg = {"batch_size": 16, "progress": False, "protocol": "sampled-99", "negatives": 2}
    whole = train("sasrec", wide, task="next_item", model_options=opts, config=TrainConfig(**cfg, **long))
    state = tmp_path / "run.pt"
    first = train("sasrec", wide, task="next_item", model_options=opts, config=TrainConfig(**cfg, **short, resume=str(state)))
    assert first["epochs_run"] < whole["epochs_run"]  # the short budget did stop it earlier
    seen = []
    longer = train("sasrec", wide, task="next_item", model_options=opts,
                   config=TrainConfig(**cfg, **long, resume=str(state)), on_epoch=lambda r: seen.append(r["epoch"]))
    assert seen == list(range(first["epochs_run"] + 1, whole["epochs_run"] + 1))
    assert longer["history"] == whole["history"] and longer["test"] == whole["test"]
    assert longer["best_epoch"] == whole["best_epoch"]
    # going back below where the run now is would rewrite history: refused
    with pytest.raises(ConfigError, match=f"reached epoch {whole['epochs_run']}, but with epochs 2 and patience"):
        train("sasrec", wide, task="next_item", model_options=opts,
              config=TrainConfig(**cfg, **{**long, "epochs": 2}, resume=str(state)))


def test_resume_refuses_a_state_of_another_run(split, tmp_path):
    state = tmp_path / "run.pt"
    cfg = {"epochs": 3, "batch_size": 16, "progress": False, "resume": str(state)}
    with pytest.raises(_Stop):
        train("sasrec", split, task="ctr", model_options=SMALL, config=TrainConfig(**cfg), on_epoch=_stop_after(2))
    with pytest.raises(ConfigError, match=r"run\.pt: written by another run \(train option 'lr'"):
        train("sasrec", split, task="ctr", model_options=SMALL, config=TrainConfig(**cfg, lr=0.01))
    with pytest.raises(ConfigError, match="written by another run \\(model"):
        train("mrff", split, task="ctr", model_options=SMALL, config=TrainConfig(**cfg))
    other_data = split_dataset(load_dataset(SPEC.replace("seed=2", "seed=3")))
    with pytest.raises(ConfigError, match="written by another run \\(split"):
        train("sasrec", other_data, task="ctr", model_options=SMALL, config=TrainConfig(**cfg))
    saved = torch.load(state, weights_only=False)
    torch.save({k: v for k, v in saved.items() if k != "optimizers"}, state)
    with pytest.raises(ConfigError, match="incomplete training state \\(no optimizers\\)"):
        train("sasrec", split, task="ctr", model_options=SMALL, config=TrainConfig(**cfg))
    torch.save({"epoch": 1, "state": {}}, state)  # what --checkpoint writes, roughly
    with pytest.raises(ConfigError, match="not a training state written by --resume"):
        train("sasrec", split, task="ctr", model_options=SMALL, config=TrainConfig(**cfg))
    state.write_text("not a torch file")
    with pytest.raises(ConfigError, match="not a readable training state"):
        train("sasrec", split, task="ctr", model_options=SMALL, config=TrainConfig(**cfg))


def test_next_item_protocols(wide):
    for protocol in ("full", "sampled-99"):
        cfg = TrainConfig(epochs=1, batch_size=16, progress=False, protocol=protocol)
        result = train("sasrec", wide, task="next_item", model_options=SMALL, config=cfg)
        assert result["protocol"] == protocol
        assert set(result["test"]) >= {"hr@10", "ndcg@10", "mrr"}
        assert 0.0 <= result["test"]["hr@10"] <= 1.0
        # who was evaluated: the users with a positive held-out item (a click log)
        valid, test = (build_examples(wide, task="next_item", stage=st, max_len=10) for st in ("valid", "test"))
        assert result["population"]["users"] == wide.n_users
        assert result["population"]["test"] == {"examples": len(test), "users": len(np.unique(test.users))}
        assert result["population"]["valid"]["examples"] == len(valid) and "positive" in result["population"]["rule"]


def test_sampled_99_needs_99_unseen_items_per_user_and_says_so_before_training(split):
    # 80 items: every user has fewer than 99 it never interacted with
    epochs = []
    with pytest.raises(DataError, match=r"user \S+ has \d+ items never interacted with, fewer than the 99"):
        train("sasrec", split, task="next_item", model_options=SMALL, on_epoch=epochs.append,
              config=TrainConfig(epochs=1, batch_size=16, progress=False, protocol="sampled-99"))
    assert epochs == []  # no epoch was trained first


def test_training_negatives_exclude_only_training_items(monkeypatch):
    """User 1 trains on items 1..8 and holds out 9 (valid) and 10 (test); users 2, 3 bring
    items 11, 12. Its training negatives come from {9, 10, 11, 12}: the held-out items are
    drawn too (as in SASRec's code), training items never."""
    import pandas as pd

    import fedrec.train as train_module
    from fedrec.data import Dataset, Interactions

    rows = [(1, i, i) for i in range(1, 11)] + [(u, i, t) for u in (2, 3) for t, i in enumerate((11, 12, 1, 2, 3))]
    frame = pd.DataFrame(rows, columns=["user", "item", "time"])
    sp = split_dataset(Dataset(name="t", interactions=Interactions.from_frame(frame, source="t")))
    drawn: dict[int, set] = {}

    def recording(examples, **kw):
        for batch in iterate_batches(examples, **kw):
            if "negatives" in batch:
                for user, neg, mask in zip(batch["user"], batch["negatives"], batch["target_mask"], strict=True):
                    raw = sp.item_raw[neg[mask].numpy().ravel()]
                    drawn.setdefault(int(sp.user_raw[int(user)]), set()).update(raw.tolist())
            yield batch

    monkeypatch.setattr(train_module, "iterate_batches", recording)
    train("sasrec", sp, task="next_item", model_options=SMALL,
          config=TrainConfig(epochs=2, batch_size=4, negatives=5, progress=False, protocol="full"))
    assert drawn[1] == {9, 10, 11, 12}


def test_bad_train_options():
    with pytest.raises(ConfigError, match="protocol"):
        TrainConfig(protocol="sampled-5")
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(epochs=0)


@pytest.mark.realdata
def test_user_click_rate_baseline_on_kuaisar(shared_data):
    split = split_dataset(load_dataset(f"kuaisar:{shared_data}/KuaiSAR-R"))
    result = train("user_ctr", split, task="ctr", config=TrainConfig(progress=False))
    # reference notes: AUC 0.688 / LogLoss 0.636 for the smoothed user click rate
    assert result["test"]["auc"] == pytest.approx(0.688, abs=0.005)
    assert result["test"]["logloss"] == pytest.approx(0.636, abs=0.005)
    pop = train("popularity", split, task="ctr", config=TrainConfig(progress=False))
    assert 0.5 < pop["test"]["auc"] < result["test"]["auc"]


def test_cli_train_json_and_errors(tmp_path):
    out = tmp_path / "r.json"
    state = tmp_path / "state.pt"
    cmd = [sys.executable, "-m", "fedrec.cli", "train", "--model", "sasrec", "--data", SPEC, "--task", "ctr",
           "--epochs", "1", "--set", "dim=16", "--set", "max-len=10", "--json", "--out", str(out), "--resume", str(state)]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert torch.load(state, weights_only=False)["finished"]
    assert "resume" not in result["train"]  # no state path in results
    # the finished state gives the same result; a different config is refused by name
    again = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert json.loads(again.stdout)["test"] == result["test"]
    other = subprocess.run([*cmd[:-2], "--seed", "3", "--resume", str(state)], capture_output=True, text=True,
                           check=False)
    assert other.returncode == 2 and "written by another run (train option 'seed'" in other.stderr
    assert {"model", "data", "task", "protocol", "valid", "test", "seconds"} <= set(result)
    assert set(result["test"]) >= {"auc", "logloss"}
    assert json.loads(out.read_text())["test"] == result["test"]
    for args, needle in [(["--model", "nope"], "unknown model 'nope'"),
                         (["--model", "user_ctr", "--task", "next_item"], "does not support task"),
                         (["--model", "sasrec", "--set", "layers=two"], "must be of type int")]:
        bad = subprocess.run([sys.executable, "-m", "fedrec.cli", "train", "--data", SPEC, *args],
                             capture_output=True, text=True)
        assert bad.returncode == 2 and needle in bad.stderr and "Traceback" not in bad.stderr


# ---- fixed sampled-ranking negatives and re-evaluation of saved models ----------------------


def test_fixed_negatives_are_the_candidates_ranked(tmp_path):
    """Test metrics with a negatives file equal HR@10 / NDCG@10 computed here by hand from the
    model's scores of [target, the file's negatives]."""
    from fedrec.data.samplers import FixedNegatives
    from fedrec.metrics import ranking_metrics, sampled_ranking_ranks

    sp = split_dataset(load_dataset(WIDE))
    negs = write_negatives(sp, tmp_path / "neg.txt")
    cfg = TrainConfig(epochs=2, batch_size=16, progress=False, protocol="sampled-99", negatives_file=str(negs),
                      checkpoint=str(tmp_path / "best.pt"))
    result = train("sasrec", sp, task="next_item", model_options=SMALL, config=cfg)
    model = create_model("sasrec", ModelData.from_split(sp), SMALL, task="next_item")
    model.load_state_dict(result["model_state"])
    model.eval()
    test = build_examples(sp, task="next_item", stage="test", max_len=10)
    fixed = FixedNegatives(negs, sp)
    batch = next(iter(iterate_batches(test, batch_size=10_000)))
    cand = torch.cat([batch["target_items"][:, -1:], torch.from_numpy(fixed.sample(test.users, 99))], dim=1)
    with torch.no_grad():
        scores = model.score_candidates(batch, cand).double().numpy()
    by_hand = ranking_metrics(sampled_ranking_ranks(scores[:, 0], scores[:, 1:]))
    assert result["test"]["hr@10"] == pytest.approx(by_hand["hr@10"], abs=1e-6)
    assert result["test"]["ndcg@10"] == pytest.approx(by_hand["ndcg@10"], abs=1e-6)
    # the uniform draws of the same run are other candidates
    uniform = train("sasrec", sp, task="next_item", model_options=SMALL,
                    config=TrainConfig(epochs=2, batch_size=16, progress=False, protocol="sampled-99"))
    assert uniform["history"][0]["loss"] == result["history"][0]["loss"]  # same training
    assert uniform["test"] != result["test"]


def test_negatives_file_option_errors(split, tmp_path):
    sp = split_dataset(load_dataset(WIDE))
    negs = write_negatives(sp, tmp_path / "neg.txt", n=99)
    base = {"epochs": 1, "batch_size": 16, "progress": False, "negatives_file": str(negs)}
    with pytest.raises(ConfigError, match="holds 99 negatives per user, protocol sampled-999 needs 999"):
        train("sasrec", sp, task="next_item", model_options=SMALL,
              config=TrainConfig(**base, protocol="sampled-99", also_test="sampled-999"))
    with pytest.raises(ConfigError, match="needs a sampled protocol"):
        train("sasrec", sp, task="next_item", model_options=SMALL, config=TrainConfig(**base, protocol="full"))
    with pytest.raises(ConfigError, match="only for next_item ranking"):
        train("sasrec", sp, task="ctr", model_options=SMALL, config=TrainConfig(**base))
    # a user without a line is found before the first epoch, not at its evaluation
    lines = negs.read_text().splitlines()
    negs.write_text("\n".join(lines[:-1]) + "\n")
    epochs = []
    with pytest.raises(DataError, match=r"neg\.txt.*no negatives for user .*\(1 users without a line\)"):
        train("sasrec", sp, task="next_item", model_options=SMALL, config=TrainConfig(**base, protocol="sampled-99"),
              on_epoch=epochs.append)
    assert epochs == []


def test_resume_with_a_negatives_file_knows_it_by_content(tmp_path):
    """The state names the negatives file by its digest: another spelling of the same path
    resumes, a file with other negatives is another run."""
    sp = split_dataset(load_dataset(WIDE))
    negs = write_negatives(sp, tmp_path / "neg.txt")
    state = tmp_path / "run.pt"
    cfg = {"epochs": 3, "batch_size": 16, "progress": False, "protocol": "sampled-99", "resume": str(state)}
    with pytest.raises(_Stop):
        train("sasrec", sp, task="next_item", model_options=SMALL,
              config=TrainConfig(**cfg, negatives_file=str(negs)), on_epoch=_stop_after(2))
    other_spelling = str(tmp_path / "." / "sub" / ".." / "neg.txt")
    (tmp_path / "sub").mkdir()
    seen = []
    train("sasrec", sp, task="next_item", model_options=SMALL,
          config=TrainConfig(**cfg, negatives_file=other_spelling), on_epoch=lambda r: seen.append(r["epoch"]))
    assert seen == [2, 3]
    write_negatives(sp, tmp_path / "other.txt", seed=9)
    with pytest.raises(ConfigError, match="train option 'negatives_file' = 'sha256:"):
        train("sasrec", sp, task="next_item", model_options=SMALL,
              config=TrainConfig(**cfg, negatives_file=str(tmp_path / "other.txt")))


def test_evaluate_saved_checkpoint_and_state_repeat_the_run(tmp_path):
    from fedrec.train import evaluate_saved

    sp = split_dataset(load_dataset(WIDE))
    ckpt, state = tmp_path / "best.pt", tmp_path / "state.pt"
    cfg = TrainConfig(epochs=3, batch_size=16, progress=False, protocol="sampled-99", also_test="full",
                      checkpoint=str(ckpt), resume=str(state))
    result = train("sasrec", sp, task="next_item", model_options=SMALL, config=cfg)
    for path, finished in ((ckpt, None), (state, True)):
        again = evaluate_saved(path, sp)
        assert again["best_epoch"] == result["best_epoch"] and again["finished"] is finished
        assert again["by_protocol"]["sampled-99"] == {"valid": result["valid"], "test": result["test"]}
        assert again["by_protocol"]["full"]["test"] == result["test_by_protocol"]["full"]
    negs = write_negatives(sp, tmp_path / "neg.txt")
    fixed = evaluate_saved(ckpt, sp, protocols=["sampled-99"], negatives_file=str(negs), stages=("test",))
    assert set(fixed["by_protocol"]) == {"sampled-99"} and set(fixed["by_protocol"]["sampled-99"]) == {"test"}
    with pytest.raises(ConfigError, match="ranking protocols do not apply"):
        ctr_ckpt = tmp_path / "ctr.pt"
        train("sasrec", sp, task="ctr", model_options=SMALL,
              config=TrainConfig(epochs=1, batch_size=16, progress=False, checkpoint=str(ctr_ckpt)))
        evaluate_saved(ctr_ckpt, sp, protocols=["full"])
    with pytest.raises(ConfigError, match="trained on another split"):
        evaluate_saved(state, split_dataset(load_dataset(WIDE.replace("seed=4", "seed=5"))))
    with pytest.raises(ConfigError, match="protocol must be one of"):
        evaluate_saved(ckpt, sp, protocols=["sampled-5"])
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="neither a --checkpoint file nor a --resume training state"):
        evaluate_saved(tmp_path / "other.pt", sp)
    with pytest.raises(ConfigError, match="file not found"):
        evaluate_saved(tmp_path / "absent.pt", sp)


def test_evaluate_saved_uses_the_runs_own_negatives(tmp_path):
    """A run trained with a negatives file: its checkpoint is re-scored on that file by
    default; its state (which keeps only the file's digest) asks for the file; '' asks for
    uniform draws."""
    from fedrec.train import evaluate_saved

    sp = split_dataset(load_dataset(WIDE))
    negs = write_negatives(sp, tmp_path / "neg.txt")
    ckpt, state = tmp_path / "best.pt", tmp_path / "state.pt"
    result = train("sasrec", sp, task="next_item", model_options=SMALL,
                   config=TrainConfig(epochs=2, batch_size=16, progress=False, protocol="sampled-99",
                                      negatives_file=str(negs), checkpoint=str(ckpt), resume=str(state)))
    assert evaluate_saved(ckpt, sp)["by_protocol"]["sampled-99"]["test"] == result["test"]
    with pytest.raises(ConfigError, match="ranked against a negatives file \\(sha256:.*pass it with --negatives-file"):
        evaluate_saved(state, sp)
    assert evaluate_saved(state, sp, negatives_file=str(negs))["by_protocol"]["sampled-99"]["test"] == result["test"]
    uniform = evaluate_saved(state, sp, negatives_file="")["by_protocol"]["sampled-99"]["test"]
    assert uniform != result["test"]


def test_evaluate_saved_refuses_weights_of_other_data(tmp_path):
    """A checkpoint on another split is refused by its split fingerprint; one written before
    checkpoints had one fails to load with a one-line error."""
    from fedrec.train import evaluate_saved

    sp = split_dataset(load_dataset(WIDE))
    ckpt = tmp_path / "best.pt"
    train("sasrec", sp, task="next_item", model_options=SMALL,
          config=TrainConfig(epochs=1, batch_size=16, progress=False, checkpoint=str(ckpt)))
    other = split_dataset(load_dataset(WIDE.replace("items=200", "items=150")))
    with pytest.raises(ConfigError, match="trained on another split"):
        evaluate_saved(ckpt, other)
    saved = torch.load(ckpt, weights_only=False)
    torch.save({k: v for k, v in saved.items() if k != "split"}, ckpt)
    with pytest.raises(ConfigError, match="do not fit this data"):
        evaluate_saved(ckpt, other)


def test_cli_evaluate(tmp_path):
    ckpt = tmp_path / "best.pt"
    base = [sys.executable, "-m", "fedrec.cli"]
    run = subprocess.run([*base, "train", "--model", "sasrec", "--data", WIDE, "--task", "next_item", "--epochs", "1",
                          "--set", "dim=16", "--set", "max-len=10", "--protocol", "sampled-99", "--json",
                          "--checkpoint", str(ckpt)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    trained = json.loads(run.stdout)
    out = tmp_path / "eval.json"
    ev = subprocess.run([*base, "evaluate", str(ckpt), "--data", WIDE, "--json", "--out", str(out)],
                        capture_output=True, text=True, check=False)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["by_protocol"]["sampled-99"]["test"] == trained["test"]
    assert json.loads(out.read_text()) == json.loads(ev.stdout)
    table = subprocess.run([*base, "evaluate", str(ckpt), "--data", WIDE, "--protocol", "full"],
                           capture_output=True, text=True, check=False)
    assert table.returncode == 0 and "hr@10" in table.stdout and "full" in table.stdout
    bad = subprocess.run([*base, "evaluate", str(tmp_path / "absent.pt"), "--data", WIDE],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "absent.pt: file not found" in bad.stderr and "Traceback" not in bad.stderr
    neg = tmp_path / "neg.txt"
    neg.write_text("1 2 3\n")
    bad = subprocess.run([*base, "evaluate", str(ckpt), "--data", WIDE, "--negatives-file", str(neg)],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "neg.txt, line 1" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.realdata
def test_lastfm_published_negatives(shared_data):
    """S3-Rec's own LastFM negatives (LastFM_sample.txt): popularity HR@10 / NDCG@10 on them
    equal a computation here from the raw file (training counts, ties counted half)."""
    path = shared_data / "s3rec" / "LastFM.txt"
    seqs = {int(line.split()[0]): [int(x) for x in line.split()[1:]] for line in path.read_text().splitlines() if line.strip()}
    negs = {int(line.split()[0]): [int(x) for x in line.split()[1:]]
            for line in (shared_data / "s3rec" / "LastFM_sample.txt").read_text().splitlines() if line.strip()}
    counts: dict[int, int] = {}
    for items in seqs.values():
        for item in items[:-2]:  # leave-one-out: the last two are valid and test
            counts[item] = counts.get(item, 0) + 1
    hits, ndcg = [], []
    for user, items in seqs.items():
        target = counts.get(items[-1], 0)
        others = [counts.get(i, 0) for i in negs[user]]
        rank = sum(c > target for c in others) + 0.5 * sum(c == target for c in others)
        hits.append(rank < 10)
        ndcg.append(1.0 / np.log2(rank + 2) if rank < 10 else 0.0)
    sp = split_dataset(load_dataset(f"seq:{path}"))
    result = train("popularity", sp, task="next_item",
                   config=TrainConfig(protocol="sampled-99", negatives_file=str(shared_data / "s3rec" / "LastFM_sample.txt"),
                                      progress=False))
    assert result["test"]["hr@10"] == pytest.approx(np.mean(hits), abs=1e-6)
    assert result["test"]["ndcg@10"] == pytest.approx(np.mean(ndcg), abs=1e-6)
    uniform = train("popularity", sp, task="next_item", config=TrainConfig(protocol="sampled-99", progress=False))
    assert uniform["test"] != result["test"]
