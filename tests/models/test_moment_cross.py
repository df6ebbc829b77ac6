"""Moment&Cross: the other-domain histories, the time limit of the search, the branch's
refusal on one-domain data, per-domain AUC, and a checkpoint that scores as the run did."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.data import load_dataset
from fedrec.data.batching import build_examples, iterate_batches
from fedrec.data.split import TRAIN, split_dataset
from fedrec.errors import ConfigError
from fedrec.models.base import ModelData
from fedrec.models.registry import create_model
from fedrec.train import TrainConfig, evaluate_saved, train

SPEC = "synthetic:users=40,items=60,domains=2,min_len=6,max_len=12,domain_ratio=3,seed=1"
SMALL = {"dim": 16, "max-len": 12, "long-len": 20, "search-top": 4, "dropout": 0.0}


@pytest.fixture(scope="module")
def split():
    return split_dataset(load_dataset(SPEC))


def test_domain_ratio_scales_the_second_domain():
    frame = load_dataset(SPEC).interactions.frame
    per = frame.groupby(["domain", "user"]).size()
    assert per["d1"].mean() > 2.5 * per["d0"].mean()
    same = load_dataset(SPEC.replace("domain_ratio=3", "domain_ratio=1")).interactions.frame
    assert frame[frame.domain == "d0"].reset_index(drop=True).equals(same[same.domain == "d0"].reset_index(drop=True))


def test_prepare_keeps_each_users_latest_training_rows_of_the_other_domains(split):
    model = create_model("moment_cross", ModelData.from_split(split), SMALL, task="ctr")
    model.prepare(split)
    d1 = split.domains.index("d1")
    for u in (1, 7, 23):
        rows = [r for s in range(split.n_sequences) if split.seq_user[s] == u and split.seq_domain[s] == d1
                for r in range(split.indptr[s], split.indptr[s + 1]) if split.part[r] == TRAIN]
        rows = sorted(rows, key=lambda r: split.time[r])[-20:]
        got = model.long_items[0, u]  # domain d0's other domain is d1
        want = torch.tensor([split.item[r] for r in rows])
        assert torch.equal(got[-len(want):], want) and (got[:-len(want)] == 0).all()
        times = model.long_times[0, u][-len(want):]
        assert (times[1:] >= times[:-1]).all()


def test_the_search_reads_only_what_came_before(split):
    torch.manual_seed(0)
    model = create_model("moment_cross", ModelData.from_split(split), SMALL, task="ctr").eval()
    model.prepare(split)
    ex = build_examples(split, task="ctr", stage="test", max_len=12)
    batch = next(iterate_batches(ex, batch_size=len(ex)))
    with torch.no_grad():
        later = model._branches(batch, batch["target_items"][:, -1:])["cross"]
        early = model._branches({**batch, "target_times": torch.full_like(batch["target_times"], -1.0)},
                                batch["target_items"][:, -1:])["cross"]
    assert later.abs().sum() > 0
    assert torch.all(early == 0)  # nothing in the other domain is earlier than time -1
    model_all = create_model("moment_cross", ModelData.from_split(split), {**SMALL, "cross-time": False}, task="ctr")
    model_all.load_state_dict(model.state_dict())
    with torch.no_grad():
        free = model_all.eval()._branches({**batch, "target_times": torch.full_like(batch["target_times"], -1.0)},
                                          batch["target_items"][:, -1:])["cross"]
    assert free.abs().sum() > 0


def test_the_cross_branch_needs_several_domains():
    one = split_dataset(load_dataset("synthetic:users=20,items=30,seed=0"))
    with pytest.raises(ConfigError, match="model 'moment_cross' needs multi-domain data"):
        create_model("moment_cross", ModelData.from_split(one), SMALL, task="ctr")
    create_model("moment_cross", ModelData.from_split(one), {**SMALL, "cross": False}, task="ctr")


def test_multi_domain_ctr_reports_each_domains_auc_and_a_checkpoint_scores_as_the_run_did(split, tmp_path):
    path = tmp_path / "mc.pt"
    result = train("moment_cross", split, task="ctr", model_options=SMALL,
                   config=TrainConfig(epochs=2, batch_size=16, progress=False, checkpoint=str(path)))
    assert {"auc", "d0/auc", "d1/auc"} <= set(result["test"])
    again = evaluate_saved(path, split)["by_protocol"]["pooled"]
    assert again["test"] == result["test"] and again["valid"] == result["valid"]


def test_the_alignment_loss_is_added(split):
    torch.manual_seed(0)
    data = ModelData.from_split(split)
    ex = build_examples(split, task="ctr", stage="train", max_len=12)
    batch = next(iterate_batches(ex, batch_size=16))
    losses = {}
    for w in (0.0, 1.0):
        torch.manual_seed(0)
        model = create_model("moment_cross", data, {**SMALL, "align-weight": w}, task="ctr").train()
        model.prepare(split)
        out = model(batch)
        losses[w] = float(model.loss(batch, out).detach())
    assert losses[1.0] > losses[0.0] + 0.5  # an InfoNCE over 16 users starts near log(16)
    assert np.isfinite(list(losses.values())).all()


def test_an_option_the_model_does_not_have_is_refused(split):
    # one attention per branch: there is no 'layers' to set (it used to be accepted and ignored)
    with pytest.raises(ConfigError, match="layers"):
        create_model("moment_cross", ModelData.from_split(split), {**SMALL, "layers": 3}, task="ctr")
