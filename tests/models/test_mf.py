"""The ``mf`` model: hand-computed scores and loss, roles, options, and central training
that beats popularity on data with a latent taste structure."""

from __future__ import annotations

import math

import pytest
import torch

from fedrec.data import load_dataset
from fedrec.data.split import split_dataset
from fedrec.errors import ConfigError
from fedrec.models.base import ModelData
from fedrec.models.registry import create_model
from fedrec.train import TrainConfig, train


def _data(users=2, items=3):
    return ModelData(users, items, False, None, None, (), ())


def _model(**options):
    model = create_model("mf", _data(), {"dim": 2, **options}, task="next_item")
    with torch.no_grad():
        model.users.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 2.0], [-1.0, 0.5]]))
        model.items.weight.copy_(torch.tensor([[0.0, 0.0], [0.5, 0.5], [1.0, -1.0], [2.0, 0.0]]))
        if model.user_bias is not None:
            model.user_bias.weight.copy_(torch.tensor([[0.0], [0.25], [-0.5]]))
        if model.item_bias is not None:
            model.item_bias.weight.copy_(torch.tensor([[0.0], [1.0], [2.0], [3.0]]))
    return model


def test_scores_are_dot_products_plus_biases():
    model = _model()
    batch = {"user": torch.tensor([1, 2])}
    cands = torch.tensor([[1, 2, 3], [3, 2, 1]])
    # user 1 = (1, 2): items (0.5, 0.5) -> 1.5, (1, -1) -> -1, (2, 0) -> 2
    assert model.score_candidates(batch, cands).tolist() == [[1.5, -1.0, 2.0], [-2.0, -1.5, -0.25]]
    assert model.score_all(batch)[0].tolist() == [0.0, 1.5, -1.0, 2.0]
    both = _model(user_bias=True, item_bias=True)
    assert both.score_candidates(batch, cands)[0].tolist() == [1.5 + 0.25 + 1, -1 + 0.25 + 2, 2 + 0.25 + 3]


def test_loss_is_the_mean_bce_over_positives_and_negatives_hand_computed():
    model = _model()
    # user 1: one real target (item 1, score 1.5) with negatives items 2 (-1) and 3 (2); a padded position
    batch = {"user": torch.tensor([1]), "items": torch.tensor([[0, 2]]), "target_items": torch.tensor([[0, 1]]),
             "target_mask": torch.tensor([[False, True]]), "negatives": torch.tensor([[[0, 0], [2, 3]]])}
    out = model(batch)
    want = (math.log1p(math.exp(-1.5)) + math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0))) / 3
    assert float(model.loss(batch, out).detach()) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ConfigError, match="sampled negatives"):
        model.loss(batch, model({k: v for k, v in batch.items() if k != "negatives"}))


def test_roles_user_tables_private_per_user_item_tables_public():
    model = _model(user_bias=True, item_bias=True)
    roles = {n: str(r) for n, r in model.parameter_roles().items()}
    assert roles == {"users.weight": "private[per-user]", "user_bias.weight": "private[per-user]",
                     "items.weight": "public", "item_bias.weight": "public"}
    assert set(model.item_tables()) == {"items.weight", "item_bias.weight"}


def test_bad_options_are_one_line_errors():
    for options, message in (({"dim": 0}, "'dim' must be a positive integer"),
                             ({"max-len": -1}, "'max_len' must be a positive integer"),
                             ({"groups": 2}, "unknown option 'groups'"),
                             ({"user-bias": "maybe"}, "must be of type bool")):
        with pytest.raises(ConfigError, match=message):
            create_model("mf", _data(), options, task="next_item")
    with pytest.raises(ConfigError, match="does not support task 'ctr'"):
        create_model("mf", _data(), {}, task="ctr")


def test_central_training_beats_popularity():
    split = split_dataset(load_dataset("synthetic:users=200,items=300,seed=3,explore=0.05,sharpness=5"))
    cfg = TrainConfig(epochs=15, batch_size=32, lr=0.05, negatives=4, protocol="sampled-99", progress=False,
                      patience=15)
    mf = train("mf", split, task="next_item", model_options={"max-len": 40, "dim": 16}, config=cfg)
    pop = train("popularity", split, task="next_item", config=cfg)
    assert mf["valid"]["ndcg@10"] > pop["valid"]["ndcg@10"] + 0.05
    assert mf["history"][-1]["loss"] < mf["history"][0]["loss"]
