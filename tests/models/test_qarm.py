"""QARM: the pretrained text encoder loads offline and is semantic, behaviour pairs read the
training split only, alignment pulls pairs together, the codes, and the model on real data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.data import load_dataset
from fedrec.data.split import TRAIN, split_dataset
from fedrec.errors import ConfigError
from fedrec.models import content as C
from fedrec.models.base import ModelData
from fedrec.models.registry import create_model
from fedrec.train import TrainConfig, train

SPEC = "synthetic:users=60,items=80,min_len=8,max_len=14,seed=2"
SMALL = {"dim": 16, "max-len": 10, "vq-anchors": 16, "vq-top": 3, "rq-levels": 2, "rq-size": 8, "align-epochs": 2}


@pytest.fixture(scope="module")
def movielens(shared_data):
    return split_dataset(load_dataset(f"movielens:{shared_data}/ml-100k"))


def test_the_text_encoder_loads_without_the_network_and_is_semantic(monkeypatch, movielens):
    import requests

    def offline(*args, **kwargs):
        raise AssertionError("the text encoder tried to download")

    monkeypatch.setattr(requests, "get", offline)
    monkeypatch.setattr(C, "_ENCODER", None)
    text = movielens.item_text
    ids = {t.split(" (")[0]: i for i, t in enumerate(text) if t}
    toy, aladdin, goldeneye = ids["Toy Story"], ids["Aladdin"], ids["GoldenEye"]
    vec = C.text_vectors([text[toy], text[aladdin], text[goldeneye]])
    assert vec.shape == (3, 256)
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, rtol=1e-5)
    # two animated children's films are closer than one and an action thriller
    assert vec[0] @ vec[1] > vec[0] @ vec[2] + 0.05
    assert text[toy] == "Toy Story (1995). Animation, Children's, Comedy"


def test_behaviour_pairs_come_from_training_positives_only():
    sp = split_dataset(load_dataset(SPEC))
    vec, source = C.content_vectors(sp, dim=8)
    assert source == "attributes" and vec.shape == (sp.n_items + 1, 8)
    pairs = C.behaviour_pairs(sp, vec, kind="item2item")
    train_pos = set()
    consecutive = set()
    for s in range(sp.n_sequences):
        rows = np.arange(sp.indptr[s], sp.indptr[s + 1])
        rows = rows[(sp.part[rows] == TRAIN) & (sp.label[rows] == 1)]
        items = sp.item[rows]
        consecutive |= set(zip(items[:-1].tolist(), items[1:].tolist()))
        train_pos |= set(items.tolist())
    assert set(map(tuple, pairs.tolist())) <= consecutive
    both = C.behaviour_pairs(sp, vec, kind="both")
    assert set(both.reshape(-1).tolist()) <= train_pos and len(both) > len(pairs)


def test_alignment_pulls_behaviour_pairs_together():
    """After alignment an item is closer to its behaviour partner than to a random item more
    often than before (on the content vectors)."""
    sp = split_dataset(load_dataset("synthetic:users=300,items=200,min_len=8,max_len=30,seed=2"))
    vec, _ = C.content_vectors(sp, dim=16)
    pairs = C.behaviour_pairs(sp, vec, kind="item2item")
    other = np.random.default_rng(0).integers(1, sp.n_items + 1, size=len(pairs))

    def wins(e):
        return float(np.mean(np.sum(e[pairs[:, 0]] * e[pairs[:, 1]], 1) > np.sum(e[pairs[:, 0]] * e[other], 1)))

    emb = C.align(vec, pairs, dim=16, epochs=5, seed=0)
    assert wins(emb) > wins(vec) + 0.03, (wins(vec), wins(emb))
    assert np.all(emb[0] == 0)
    np.testing.assert_allclose(np.linalg.norm(emb[1:], axis=1), 1.0, rtol=1e-5)


def test_vq_and_rq_codes():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((101, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[0] = 0
    vq = C.vq_codes(emb, anchors=20, top=4, seed=0)
    assert vq.shape == (101, 4) and (vq[0] == 0).all() and vq[1:].min() >= 1 and vq[1:].max() <= 20
    assert all(len(set(row)) == 4 for row in vq[1:].tolist())
    rq = C.rq_codes(emb, levels=3, size=10, seed=0)
    assert rq.shape == (101, 3) and (rq[0] == 0).all() and rq[1:].min() >= 1 and rq[1:].max() <= 10
    # items sharing a first-level code are closer than items that do not
    same = rq[1:, 0][:, None] == rq[1:, 0][None, :]
    sims = emb[1:] @ emb[1:].T
    off = ~np.eye(100, dtype=bool)
    assert sims[same & off].mean() > sims[~same].mean() + 0.2


@pytest.mark.parametrize("options, message", [
    ({"content": "clip"}, "'content' must be one of"),
    ({"pairs": "swing"}, "'pairs' must be one of"),
    ({"vq-top": 30, "vq-anchors": 16}, "'vq-top' \\(30\\) must be <= 'vq-anchors'"),
    ({"rq-levels": 0}, "'rq-levels' must be a positive integer"),
])
def test_bad_options(options, message):
    sp = split_dataset(load_dataset(SPEC))
    with pytest.raises(ConfigError, match=message):
        create_model("qarm", ModelData.from_split(sp), {**SMALL, **options}, task="ctr")


def test_prepare_needs_item_content():
    sp = split_dataset(load_dataset(SPEC))
    sp.item_features = None
    model = create_model("qarm", ModelData.from_split(split_dataset(load_dataset(SPEC))), SMALL, task="ctr")
    with pytest.raises(ConfigError, match="QARM needs item content"):
        model.prepare(sp)


def test_codes_are_saved_with_the_model():
    sp = split_dataset(load_dataset(SPEC))
    result = train("qarm", sp, task="ctr", model_options=SMALL, config=TrainConfig(epochs=1, progress=False))
    fresh = create_model("qarm", ModelData.from_split(sp), SMALL, task="ctr")
    assert (fresh.items.vq_codes == 0).all()
    fresh.load_state_dict(result["model_state"])
    assert (fresh.items.vq_codes[1:] > 0).all() and (fresh.items.rq_codes[1:] > 0).all()
    codes = fresh.items.rq_codes.clone()
    torch.manual_seed(123)  # another seed would give other codes: loaded ones are kept
    fresh.prepare(sp)
    assert torch.equal(fresh.items.rq_codes, codes)


def test_a_checkpoint_scores_as_the_run_did(tmp_path):
    from fedrec.train import evaluate_saved

    sp = split_dataset(load_dataset(SPEC))
    path = tmp_path / "qarm.pt"
    result = train("qarm", sp, task="ctr", model_options=SMALL,
                   config=TrainConfig(epochs=2, progress=False, checkpoint=str(path)))
    again = evaluate_saved(path, sp)
    assert again["by_protocol"]["pooled"]["test"] == result["test"]
    assert again["by_protocol"]["pooled"]["valid"] == result["valid"]


def test_on_movielens_100k_codes_come_from_titles_and_feed_the_ranker(movielens):
    options = {"max-len": 50, "align-epochs": 1}
    torch.manual_seed(0)
    model = create_model("qarm", ModelData.from_split(movielens), options, task="ctr")
    model.prepare(movielens)
    info = model.content_info
    assert info["source"] == "wordllama" and info["content_dim"] == 256 and info["pairs"] > 10_000
    assert info["rq_distinct"] > 0.5 * movielens.n_items  # the codes tell most items apart
    result = train("qarm", movielens, task="ctr", model_options=options,
                   config=TrainConfig(epochs=2, progress=False))
    assert result["test"]["auc"] > 0.65


def test_user_to_item_pairs_take_the_most_similar_of_the_previous_window():
    sp = split_dataset(load_dataset(SPEC))
    rng = np.random.default_rng(1)
    vec = rng.standard_normal((sp.n_items + 1, 8)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    got = C.behaviour_pairs(sp, vec, kind="user2item", window=3)
    want = []
    for s in range(sp.n_sequences):
        rows = np.arange(sp.indptr[s], sp.indptr[s + 1])
        items = sp.item[rows[(sp.part[rows] == TRAIN) & (sp.label[rows] == 1)]]
        for i in range(1, len(items)):
            earlier = items[max(0, i - 3):i]
            want.append((int(earlier[np.argmax(vec[earlier] @ vec[items[i]])]), int(items[i])))
    want = [p for p in want if p[0] != p[1]]
    assert [tuple(p) for p in got.tolist()] == want
