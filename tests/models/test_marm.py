"""MARM: the window's stop-gradient values are what a cache written by earlier requests holds,
the store is saved with the model and serves lookups, the FLOPs accounting, real data."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from fedrec.data import load_dataset
from fedrec.data.batching import build_examples, iterate_batches
from fedrec.data.split import split_dataset
from fedrec.errors import ConfigError
from fedrec.models.base import ModelData
from fedrec.models.marm import flops_per_request
from fedrec.models.registry import create_model
from fedrec.train import TrainConfig, train

OPTIONS = {"dim": 16, "layers": 3, "heads": 2, "dropout": 0.0, "max-len": 10}


@pytest.fixture(scope="module")
def split():
    return split_dataset(load_dataset("synthetic:users=30,items=400,min_len=12,max_len=14,seed=4"))


def _window(split, user_row=0):
    ex = build_examples(split, task="ctr", stage="train", max_len=10)
    batch = next(iterate_batches(ex, batch_size=len(ex)))
    for r in range(len(ex)):
        items = batch["items"][r]
        if (items > 0).all() and len(set(items.tolist())) == items.numel():  # a full window, no repeats
            return {k: v[r:r + 1] for k, v in batch.items()}
    raise AssertionError("no full window without repeated items")


def test_the_window_equals_serving_each_request_from_a_cache_written_by_the_earlier_ones(split):
    torch.manual_seed(0)
    data = ModelData.from_split(split)
    model = create_model("marm", data, OPTIONS, task="ctr")
    batch = _window(split)
    model.train()  # dropout 0: deterministic; the store is written in training only
    one_pass = model(batch)["logits"][0]  # every position at once, values from the window
    streamed = create_model("marm", data, OPTIONS, task="ctr")
    streamed.load_state_dict(model.state_dict())
    streamed.store.load({"keys": torch.zeros(0, dtype=torch.long), "values": torch.zeros(0, streamed.store.width)})
    T = batch["items"].shape[1]
    for t in range(T):
        # request t: the history up to position t, left-padded; then write its layer values
        prefix = {k: batch[k].clone() for k in ("user", "items", "labels", "target_items", "target_mask")}
        for k in ("items", "labels", "target_items"):
            prefix[k] = torch.cat([torch.zeros(1, T - t - 1, dtype=batch[k].dtype), batch[k][:, :t + 1]], dim=1)
        prefix["target_mask"] = torch.zeros(1, T, dtype=torch.bool)
        prefix["target_mask"][0, -1] = True
        streamed.eval()
        with torch.no_grad():
            served = streamed._serve(prefix, prefix["target_items"][:, -1:])[0, 0]
        torch.testing.assert_close(served, one_pass[t], atol=1e-5, rtol=1e-5)
        streamed.train()
        with torch.no_grad():
            streamed(prefix)  # writes z_1..z_{L-1} of (user, target t) into the store
    report = streamed.cache_report()
    assert report["entries"] == T and report["bytes"] == T * 2 * 16 * 4
    # request t looked up t + 1 history items over 2 cached layers; all but the first hit
    assert report["lookups"] == sum(t + 1 for t in range(T)) * 2
    assert report["hits"] == sum(t for t in range(T)) * 2


def test_cached_values_carry_no_gradient_and_uncached_ones_do(split):
    data = ModelData.from_split(split)
    batch = _window(split)
    for cache in (True, False):
        torch.manual_seed(0)
        model = create_model("marm", data, {**OPTIONS, "cache": cache}, task="ctr").train()
        outs, used = model._window(batch, batch["target_items"])
        assert used[0].requires_grad  # layer 1 reads the item embeddings
        assert all(v.requires_grad is (not cache) for v in used[1:])  # the cached layers
        assert all(o.requires_grad for o in outs)


def test_the_store_is_saved_with_the_model(split):
    cfg = TrainConfig(epochs=1, batch_size=16, progress=False)
    result = train("marm", split, task="ctr", model_options=OPTIONS, config=cfg)
    buffer = io.BytesIO()
    torch.save(result["model_state"], buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    data = ModelData.from_split(split)
    a = create_model("marm", data, OPTIONS, task="ctr")
    a.load_state_dict(state)
    assert a.cache_report()["entries"] > 0
    test = build_examples(split, task="ctr", stage="test", max_len=10)
    batch = next(iterate_batches(test, batch_size=len(test)))
    a.eval()
    with torch.no_grad():
        p = a.predict_ctr(batch)
    report = a.cache_report()
    assert 0.5 < report["hit_rate"] <= 1.0
    b = create_model("marm", data, OPTIONS, task="ctr")  # an empty store serves only stand-ins
    b.load_state_dict({k: v for k, v in state.items() if not k.endswith("_extra_state")}, strict=False)
    b.eval()
    with torch.no_grad():
        assert not torch.allclose(b.predict_ctr(batch), p)
        every = a.predict_ctr_candidates(batch, torch.arange(data.n_items + 1))
    torch.testing.assert_close(every[torch.arange(len(p)), batch["target_items"][:, -1]], p)


def test_flops_per_request():
    assert flops_per_request(50, layers=1, dim=32, cached=True) == flops_per_request(50, layers=1, dim=32, cached=False)
    cached = flops_per_request(200, layers=2, dim=32, cached=True)
    uncached = flops_per_request(200, layers=2, dim=32, cached=False)
    one = flops_per_request(200, layers=1, dim=32, cached=True)
    assert cached == 2 * one and uncached > 2.5 * cached
    # the saving grows with the history length
    assert (flops_per_request(800, layers=2, dim=32, cached=False) / flops_per_request(800, layers=2, dim=32, cached=True)
            > uncached / cached)


def test_marm_is_a_ranking_model(split):
    with pytest.raises(ConfigError, match=r"does not support task .next_item. \(it supports: ctr\)"):
        create_model("marm", ModelData.from_split(split), OPTIONS, task="next_item")


def test_on_movielens_100k_marm_learns_and_serves_from_its_cache(shared_data):
    split = split_dataset(load_dataset(f"movielens:{shared_data}/ml-100k"))
    cfg = TrainConfig(epochs=2, batch_size=64, progress=False)
    result = train("marm", split, task="ctr", model_options={"max-len": 50}, config=cfg)
    assert result["test"]["auc"] > 0.70  # user click rate 0.6727, popularity 0.7363 (ml100k_ctr)
    model = create_model("marm", ModelData.from_split(split), {"max-len": 50}, task="ctr")
    model.load_state_dict(result["model_state"])
    test = build_examples(split, task="ctr", stage="test", max_len=50)
    model.eval()
    with torch.no_grad():
        for batch in iterate_batches(test, batch_size=512):
            model.predict_ctr(batch)
    report = model.cache_report()
    # every training impression was scored in training; the test history also holds the
    # validation impression, never scored in training: a miss
    assert report["hit_rate"] > 0.95
    # one entry per (user, item) scored in training: each window's targets (MovieLens has no
    # repeated pairs); a window is the user's last max-len + 1 training impressions
    per_user = np.bincount(split.row_user[split.part == 0], minlength=split.n_users + 1)[1:]
    assert report["entries"] == int(np.sum(np.minimum(per_user, 51) - 1))


def test_a_marm_checkpoint_scores_as_the_run_did(split, tmp_path):
    from fedrec.train import evaluate_saved

    path = tmp_path / "marm.pt"
    result = train("marm", split, task="ctr", model_options=OPTIONS,
                   config=TrainConfig(epochs=2, batch_size=16, progress=False, checkpoint=str(path)))
    again = evaluate_saved(path, split)["by_protocol"]["pooled"]
    assert again["test"] == result["test"] and again["valid"] == result["valid"]


def test_the_store_keeps_a_pairs_later_row_and_skips_first_items_that_come_again(split):
    from fedrec.models.marm import _CacheStore

    store = _CacheStore(2, 100)
    store.put(torch.tensor([1, 1]), torch.tensor([5, 5]), torch.tensor([[1.0, 1.0], [2.0, 2.0]]))
    values, hit = store.get(torch.tensor([1]), torch.tensor([[5]]))
    assert hit.all() and torch.equal(values[0, 0], torch.tensor([2.0, 2.0]))
    # a window whose first item is also a later target: its stored value (written from that
    # later position, whose history holds this window's labels) is not read
    data = ModelData.from_split(split)
    model = create_model("marm", data, {**OPTIONS, "layers": 2}, task="ctr").train()
    batch = _window(split)
    first_item = int(batch["items"][0, 0])
    batch = {k: v.clone() for k, v in batch.items()}
    batch["target_items"][0, 3] = first_item
    marker = torch.full((1, model.store.width), 7.0)
    model.store.put(batch["user"], torch.tensor([first_item]), marker)
    _, used = model._window(batch, batch["target_items"])
    assert not torch.allclose(used[1][0, 0], torch.full((OPTIONS["dim"],), 7.0))
    batch["target_items"][0, 3] = 0  # no repeat: the store's value is read
    _, used = model._window(batch, batch["target_items"])
    assert torch.allclose(used[1][0, 0], torch.full((OPTIONS["dim"],), 7.0))
