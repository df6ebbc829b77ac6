"""CRM: the condition column, the serving conditions, that the condition reaches the user
tower, and that serving a higher condition retrieves higher-valued items (synthetic and
MovieLens-100K)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from fedrec.data import load_dataset
from fedrec.data.batching import build_examples, iterate_batches
from fedrec.data.interactions import Dataset, Interactions
from fedrec.data.split import split_dataset
from fedrec.errors import ConfigError, DataError
from fedrec.models.base import ModelData
from fedrec.models.crm import parse_serve
from fedrec.models.registry import create_model
from fedrec.train import TrainConfig, train

SMALL = {"dim": 16, "max-len": 8, "dropout": 0.0, "layers": 1}


def _rated_split(frame: pd.DataFrame):
    return split_dataset(Dataset("test", Interactions.from_frame(frame, source="test")))


def _two_kinds(n_users: int = 60, seed: int = 0) -> pd.DataFrame:
    """Every user consumes items 1-10 with rating 5 and items 11-20 with rating 1, interleaved
    at random: only the condition tells which kind comes next."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        good = rng.choice(np.arange(1, 11), 6, replace=False)
        bad = rng.choice(np.arange(11, 21), 6, replace=False)
        seq = np.concatenate([good, bad])
        rng.shuffle(seq)
        for t, i in enumerate(seq):
            rows.append((u, int(i), t, 5.0 if i <= 10 else 1.0))
    return pd.DataFrame(rows, columns=["user", "item", "time", "rating"])


def test_data_without_a_value_column_is_refused_when_the_model_is_built():
    split = split_dataset(load_dataset("synthetic:users=20,items=30,min_len=6,max_len=8,seed=0"))
    with pytest.raises(ConfigError, match="model 'crm' conditions on a per-interaction value: the data has no 'rating'"):
        create_model("crm", ModelData.from_split(split), SMALL, task="next_item")
    rated = _rated_split(_two_kinds(10))
    with pytest.raises(ConfigError, match="no 'value' column \\(it has: rating\\)"):
        create_model("crm", ModelData.from_split(rated), {**SMALL, "condition": "value"}, task="next_item")


@pytest.mark.parametrize("options, message", [
    ({"serve": "mean,often"}, "'serve' must be a comma-separated list"),
    ({"serve": "inf"}, "'serve' must be a comma-separated list"),
    ({"condition": "clicks"}, "'condition' must be one of auto, rating, value"),
    ({"interests": 3}, "'interests' does not apply to CRM"),
])
def test_bad_options_are_one_line_errors(options, message):
    rated = _rated_split(_two_kinds(10))
    with pytest.raises(ConfigError, match=message):
        create_model("crm", ModelData.from_split(rated), {**SMALL, **options}, task="next_item")


def test_value_column_must_be_finite():
    frame = pd.DataFrame({"user": [1, 1], "item": [1, 2], "time": [0, 1], "value": [3.0, math.inf]})
    with pytest.raises(DataError, match="value must be finite"):
        Interactions.from_frame(frame, source="x.csv")


def test_parse_serve():
    assert parse_serve("mean") == ("mean",)
    assert parse_serve(" Max , 4.5,last") == ("max", 4.5, "last")


def test_serving_conditions_come_from_the_users_own_history():
    rated = _rated_split(_two_kinds(10))
    model = create_model("crm", ModelData.from_split(rated), {**SMALL, "serve": "mean,max,min,median,last,2.5"},
                         task="next_item")
    items = torch.tensor([[0, 0, 3, 4, 5], [0, 0, 0, 0, 0]])
    ratings = torch.tensor([[math.nan, math.nan, 4.0, 1.0, 2.0], [math.nan] * 5])
    got = model.serving_conditions({"items": items, "ratings": ratings})
    torch.testing.assert_close(got[0], torch.tensor([7 / 3, 4.0, 1.0, 2.0, 2.0, 2.5]))
    # no history: every statistic is 0, a fixed value stays itself
    torch.testing.assert_close(got[1], torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 2.5]))


def test_the_condition_reaches_the_user_tower():
    rated = _rated_split(_two_kinds(20))
    ex = build_examples(rated, task="next_item", stage="train", max_len=8)
    batch = next(iterate_batches(ex, batch_size=8))
    assert batch["ratings"].shape == batch["items"].shape == batch["target_ratings"].shape
    torch.manual_seed(0)
    for history in (True, False):
        model = create_model("crm", ModelData.from_split(rated), {**SMALL, "history-conditions": history},
                             task="next_item").eval()
        base = model(batch)["logits"]
        flipped = model({**batch, "target_ratings": 6.0 - batch["target_ratings"]})["logits"]
        assert not torch.allclose(base[batch["target_mask"]], flipped[batch["target_mask"]])
        other_history = model({**batch, "ratings": 6.0 - batch["ratings"]})["logits"]
        assert torch.allclose(base, other_history) is (not history)


def _top_value(model, split, values) -> float:
    test = build_examples(split, task="next_item", stage="test", max_len=8)
    batch = next(iterate_batches(test, batch_size=len(test)))
    with torch.no_grad():
        scores = model.score_all(batch)
    scores[:, 0] = -math.inf
    top = scores.topk(5, dim=1).indices.numpy()
    return float(values[top].mean())


def test_serving_a_higher_condition_retrieves_higher_valued_items():
    split = _rated_split(_two_kinds(80))
    cfg = TrainConfig(epochs=15, batch_size=32, lr=0.01, progress=False, patience=15)
    result = train("crm", split, task="next_item", model_options=SMALL, config=cfg)
    values = np.full(split.n_items + 1, np.nan)
    values[1:] = np.where(split.item_raw[1:] <= 10, 5.0, 1.0)
    out = {}
    for serve in ("1", "5"):
        model = create_model("crm", ModelData.from_split(split), {**SMALL, "serve": serve}, task="next_item")
        model.load_state_dict(result["model_state"])
        out[serve] = _top_value(model.eval(), split, values)
    # served at 5 the top 5 are (nearly) all rating-5 items, served at 1 (nearly) all rating-1
    assert out["5"] > 4.0 and out["1"] < 2.0, out


def test_on_movielens_100k_the_served_rating_moves_what_is_retrieved(shared_data):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "simulations"))
    from crm_control import control_metrics, item_values

    split = split_dataset(load_dataset(f"movielens:{shared_data}/ml-100k?implicit=true"))
    options = {"dim": 32, "max-len": 50}
    cfg = TrainConfig(epochs=2, batch_size=128, progress=False, patience=2)
    result = train("crm", split, task="next_item", model_options=options, config=cfg)
    values = item_values(split)
    test = build_examples(split, task="next_item", stage="test", max_len=50)
    got = {}
    for serve in ("1", "5"):
        model = create_model("crm", ModelData.from_split(split), {**options, "serve": serve}, task="next_item")
        model.load_state_dict(result["model_state"])
        got[serve] = control_metrics(model, test, values)
    assert got["5"]["users"] == len(test) == split.n_users
    # mean rating of the retrieved items: higher when a higher rating is served
    assert got["5"]["top10_value"] > got["1"]["top10_value"] + 0.05, got
    # the library's own full-ranking HR@10 is what the control script measures at serve=mean
    model = create_model("crm", ModelData.from_split(split), options, task="next_item")
    model.load_state_dict(result["model_state"])
    assert control_metrics(model, test, values)["hr@10"] == pytest.approx(result["test"]["hr@10"], abs=1e-6)


def test_last_is_the_newest_real_value():
    rated = _rated_split(_two_kinds(10))
    model = create_model("crm", ModelData.from_split(rated), {**SMALL, "serve": "last"}, task="next_item")
    items = torch.tensor([[0, 3, 4, 5]])
    ratings = torch.tensor([[math.nan, 2.0, 4.0, math.nan]])  # the newest has no value
    assert model.serving_conditions({"items": items, "ratings": ratings}).tolist() == [[4.0]]
