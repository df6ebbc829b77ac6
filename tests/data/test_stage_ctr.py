"""Stage-aware CTR ranking on RecFlow-style data (issue 17): the stage samples of each
impression's own request as extra non-clicks (``stage-loss = bce``) or in RecFlow's FSLTR
pairwise loss (``fsltr``), and the per-request ranking metrics (``stage/...``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedrec.data import load_dataset
from fedrec.data.batching import build_examples, iterate_batches
from fedrec.data.samplers import StageIndex, StageNegativeSampler
from fedrec.data.split import split_dataset
from fedrec.errors import ConfigError
from fedrec.train import TrainConfig, stage_ctr_loss, stage_ranking_metrics, train

SPEC = "synthetic:kind=recflow,users=40,items=120,requests=6,candidates=40,seed=3"
OPTIONS = {"dim": 16, "max-len": 8}


@pytest.fixture(scope="module")
def split():
    return split_dataset(load_dataset(SPEC))


def _requests(sp):
    out: dict[tuple[int, int], dict[int, int]] = {}
    for u, t, i, lev in zip(sp.stage_user, sp.stage_time, sp.stage_item, sp.stage_level):
        out.setdefault((int(u), int(t)), {})[int(i)] = int(lev)
    return out


def test_ctr_batches_carry_each_impressions_own_request_stage_samples(split):
    sp = split
    ex = build_examples(sp, task="ctr", stage="train", max_len=8)
    batch = next(iterate_batches(ex, batch_size=16, num_negatives=5, sampler=StageNegativeSampler(sp, seed=0, stage=5)))
    requests = _requests(sp)
    neg, lev = batch["negatives"].numpy(), batch["negative_levels"].numpy()
    assert neg.shape == lev.shape == (16, 8, 5)
    checked = 0
    for b in range(16):
        for t in range(8):
            row = ex.target_rows[b, t]
            if row < 0:
                assert (neg[b, t] == 0).all() and (lev[b, t] == 0).all()
                continue
            own = requests.get((int(sp.row_user[row]), int(sp.time[row])), {})
            for item, level in zip(neg[b, t], lev[b, t]):
                if not own:
                    assert item == 0 and level == 0
                else:  # a stage sample of this very request, with the stage it reached
                    assert own[int(item)] == level and 1 <= level <= 4
                    checked += 1
    assert checked > 100


def test_stage_index_pads_every_request(split):
    index = StageIndex(split)
    ex = build_examples(split, task="ctr", stage="test", max_len=8)
    rows = ex.target_rows[:, -1]
    items, levels = index.padded(rows)
    requests = _requests(split)
    for r, its, levs in zip(rows, items, levels):
        own = requests.get((int(split.row_user[r]), int(split.time[r])), {})
        got = {int(i): int(v) for i, v in zip(its, levs) if i > 0}
        assert got == own  # every stage sample of the request, once, and only those
    assert (items[levels == 0] == 0).all()
    deep = StageIndex(split, min_stage=3)
    assert (deep.levels >= 3).all() and len(deep.items) < len(index.items)


def _batch(labels, negatives, levels):
    return {"target_labels": torch.tensor(labels, dtype=torch.float32),
            "target_mask": torch.ones(len(labels), len(labels[0]), dtype=torch.bool),
            "negatives": torch.tensor(negatives), "negative_levels": torch.tensor(levels)}


def test_stage_losses_by_hand():
    # one position: a click scored 2.0; stage samples at levels 4 and 1 scored 1.0 and 3.0; one empty slot
    batch = _batch([[1.0]], [[[7, 9, 0]]], [[[4, 1, 0]]])
    out = {"logits": torch.tensor([[2.0]]), "neg_logits": torch.tensor([[[1.0, 3.0, 5.0]]])}
    bce = stage_ctr_loss(TrainConfig(stage_negatives=3, stage_weight=2.0))(batch, out)
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  softplus
    assert bce.item() == pytest.approx(2.0 * (sp(1.0) + sp(3.0)) / 2)  # the empty slot adds nothing
    fsltr = stage_ctr_loss(TrainConfig(stage_negatives=3, stage_loss="fsltr"))(batch, out)
    # pairs (higher first): click > level 4, click > level 1, level 4 > level 1
    pairs = [sp(1.0 - 2.0), sp(3.0 - 2.0), sp(3.0 - 1.0)]
    assert fsltr.item() == pytest.approx(sum(pairs) / 3)
    # a non-click (priority 5) still ranks above every stage sample
    non_click = stage_ctr_loss(TrainConfig(stage_negatives=3, stage_loss="fsltr"))(_batch([[0.0]], [[[7, 9, 0]]],
                                                                                           [[[4, 1, 0]]]), out)
    assert non_click.item() == pytest.approx(fsltr.item())
    # a position without stage samples adds nothing
    empty = stage_ctr_loss(TrainConfig(stage_negatives=3, stage_loss="fsltr"))(_batch([[1.0]], [[[0, 0, 0]]],
                                                                                       [[[0, 0, 0]]]), out)
    assert empty.item() == 0.0


def test_stage_ranking_ranks_each_click_among_its_requests_stage_samples(split):
    class Oracle(torch.nn.Module):
        """Scores an item by its index: the click always ranks by how many of its request's
        stage samples have a larger index."""

        def predict_ctr_candidates(self, batch, candidates):
            return candidates.double() / 1000

    ex = build_examples(split, task="ctr", stage="test", max_len=8)
    got = stage_ranking_metrics(Oracle(), ex, batch_size=7, ks=(1, 5))
    index = StageIndex(split)
    rows = ex.target_rows[:, -1]
    items, _ = index.padded(rows)
    clicked = split.label[rows] > 0
    has = (items > 0).any(axis=1)
    ranks = np.array([(items[k][items[k] > 0] > split.item[rows[k]]).sum() for k in np.flatnonzero(clicked & has)])
    assert got["stage/n"] == len(ranks) > 5
    assert got["stage/hr@5"] == pytest.approx(np.mean(ranks < 5))
    assert got["stage/mrr"] == pytest.approx(np.mean(1.0 / (ranks + 1)))


@pytest.mark.parametrize("loss", ["bce", "fsltr"])
def test_stage_aware_ctr_training_runs_reports_stage_metrics_and_differs(split, loss):
    base = train("sasrec", split, task="ctr", model_options=OPTIONS, config=TrainConfig(epochs=2, progress=False))
    staged = train("sasrec", split, task="ctr", model_options=OPTIONS,
                   config=TrainConfig(epochs=2, progress=False, stage_negatives=3, stage_loss=loss))
    for run in (base, staged):  # exposure-only runs are ranked within requests too
        assert 0 < run["test"]["stage/n"] and 0.0 <= run["test"]["stage/hr@10"] <= 1.0
    assert staged["test"]["auc"] != base["test"]["auc"]
    assert staged["train"]["stage_loss"] == loss and staged["train"]["stage_negatives"] == 3


@pytest.mark.parametrize("model, task, options, message", [
    ("sasrec", "ctr", {"stage_loss": "fsltr"}, "'stage-loss' needs 'stage-negatives' > 0"),
    ("sasrec", "ctr", {"stage_weight": 0.5}, "'stage-weight' needs 'stage-negatives' > 0"),
    ("sasrec", "next_item", {"stage_negatives": 1, "stage_loss": "fsltr"}, "'stage-loss' is for the ctr task"),
    ("marm", "ctr", {"stage_negatives": 1}, "model 'marm' does not score stage samples"),
    ("user_ctr", "ctr", {"stage_negatives": 1}, "model 'user_ctr' is fitted by counting"),
])
def test_stage_options_that_cannot_apply_are_refused_before_training(split, model, task, options, message):
    with pytest.raises(ConfigError, match=message):
        train(model, split, task=task, model_options=OPTIONS if model == "sasrec" else None,
              config=TrainConfig(epochs=1, progress=False, **options))


def test_stage_negatives_need_stage_samples():
    plain = split_dataset(load_dataset("synthetic:users=30,items=40,seed=0"))
    with pytest.raises(ConfigError, match="needs data with stage samples"):
        train("sasrec", plain, task="ctr", model_options=OPTIONS,
              config=TrainConfig(epochs=1, progress=False, stage_negatives=2))
