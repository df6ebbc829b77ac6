"""CRM: the condition column, the serving conditions, that the condition reaches the user
tower, and that serving a higher condition retrieves higher-valued items (synthetic and
MovieLens-100K). CRM-DT (``tower = "dt"``): the value-to-go, causality over the interleaved
tokens, the serving to-go at the last position, and its control effect."""

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
from fedrec.models.crm import parse_serve, value_to_go
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
    ({"tower": "gpt"}, "'tower' must be one of concat, dt \\(got 'gpt'\\)"),
    ({"tower": "dt", "to-go": "median"}, "'to-go' must be one of sum, mean \\(got 'median'\\)"),
    ({"to-go": "sum"}, "'to-go' applies to tower = \"dt\" only"),
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


# -- CRM-DT ------------------------------------------------------------------------------

DT = {**SMALL, "tower": "dt"}


def test_value_to_go_by_hand():
    nan = math.nan
    values = torch.tensor([[nan, 2.0, 4.0, 1.0], [3.0, nan, 4.0, 1.0]])
    real = ~torch.isnan(values)
    # sum: the window's remaining values from each step on; a step without a value adds nothing
    torch.testing.assert_close(value_to_go(values, real, "sum"), torch.tensor([[7.0, 7.0, 5.0, 1.0], [8.0, 5.0, 5.0, 1.0]]))
    # mean: that sum over the steps with a value from each step on
    torch.testing.assert_close(value_to_go(values, real, "mean"),
                               torch.tensor([[7 / 3, 7 / 3, 5 / 2, 1.0], [8 / 3, 5 / 2, 5 / 2, 1.0]]))
    nothing = torch.tensor([[nan, nan]])
    assert value_to_go(nothing, ~torch.isnan(nothing), "mean").tolist() == [[0.0, 0.0]]


def test_dt_defaults_and_options():
    rated = _rated_split(_two_kinds(10))
    data = ModelData.from_split(rated)
    model = create_model("crm", data, DT, task="next_item")
    assert (model.cfg.to_go, model.cfg.history_conditions) == ("sum", False)
    assert not hasattr(model, "tower") and not hasattr(model, "history_mlp")
    concat = create_model("crm", data, SMALL, task="next_item")
    assert (concat.cfg.to_go, concat.cfg.history_conditions) == (None, True)
    with_values = create_model("crm", data, {**DT, "to-go": "mean", "history-conditions": True}, task="next_item")
    assert with_values.cfg.to_go == "mean" and hasattr(with_values, "history_mlp")


def test_dt_is_causal_over_the_interleaved_tokens():
    """The output at step t's to-go token sees the items up to x_t and the to-gos up to g_t:
    changing anything later leaves it alone; changing x_t or g_t moves it."""
    rated = _rated_split(_two_kinds(10))
    torch.manual_seed(0)
    model = create_model("crm", ModelData.from_split(rated), DT, task="next_item").eval()
    items = torch.tensor([[0, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6]])
    to_go = torch.tensor([[9.0, 9.0, 8.0, 6.0, 3.0, 1.0], [12.0, 10.0, 8.0, 6.0, 4.0, 2.0]])
    base = model.encode_dt({"items": items}, to_go)
    assert base.shape == (2, 6, 16)
    for t in range(5):
        later_items = items.clone()
        later_items[:, t + 1:] = torch.tensor([11, 12, 13, 14, 15])[: 5 - t]
        later_to_go = to_go.clone()
        later_to_go[:, t + 1:] = 50.0
        got = model.encode_dt({"items": later_items}, later_to_go)
        torch.testing.assert_close(got[:, : t + 1], base[:, : t + 1])
        assert not torch.allclose(got[1, t + 1:], base[1, t + 1:])
        own_item = items.clone()
        own_item[:, t + 1] = 20
        assert not torch.allclose(model.encode_dt({"items": own_item}, to_go)[:, t + 1], base[:, t + 1])
        own_to_go = to_go.clone()
        own_to_go[:, t] += 3.0
        moved = model.encode_dt({"items": items}, own_to_go)
        torch.testing.assert_close(moved[:, :t], base[:, :t])
        assert not torch.allclose(moved[1, t], base[1, t])


def test_dt_trains_on_the_targets_to_go_and_not_on_the_items_own_values():
    rated = _rated_split(_two_kinds(20))
    batch = next(iterate_batches(build_examples(rated, task="next_item", stage="train", max_len=8), batch_size=8))
    torch.manual_seed(0)
    model = create_model("crm", ModelData.from_split(rated), DT, task="next_item").eval()
    base = model(batch)["logits"]
    # the last target's value is in every step's sum-to-go
    last = batch["target_ratings"].clone()
    last[:, -1] = 6.0 - last[:, -1]
    assert not torch.allclose(model({**batch, "target_ratings": last})["logits"][:, 0], base[:, 0])
    # item tokens carry no value of their own by default
    torch.testing.assert_close(model({**batch, "ratings": 6.0 - batch["ratings"]})["logits"], base)


def test_dt_serving_puts_the_served_condition_at_the_last_step():
    rated = _rated_split(_two_kinds(10))
    items = torch.tensor([[0, 0, 3, 4, 5]])
    ratings = torch.tensor([[math.nan, math.nan, 4.0, 1.0, 2.0]])
    batch = {"items": items, "ratings": ratings}
    model = create_model("crm", ModelData.from_split(rated), {**DT, "serve": "mean,max,5"}, task="next_item").eval()
    got = model.serving_to_go(batch)  # (1, 3, 5): step t's target is history item t + 1, then c
    c = torch.tensor([7 / 3, 4.0, 5.0])
    torch.testing.assert_close(got[0, :, -1], c)  # the last step: one step remains, its to-go is c
    # earlier steps: the history's later values plus c (the padded first step is never read)
    torch.testing.assert_close(got[0, :, 1:], torch.stack([7 + c, 3 + c, 2 + c, c], dim=1))
    mean = create_model("crm", ModelData.from_split(rated), {**DT, "serve": "5", "to-go": "mean"}, task="next_item")
    torch.testing.assert_close(mean.serving_to_go(batch)[0, 0, 1:], torch.tensor([12 / 4, 8 / 3, 7 / 2, 5.0]))
    # each request is its own pass under its own to-gos; the batch's target values are never read
    with torch.no_grad():
        u = model.serving_vectors(batch)
        for k in range(3):
            torch.testing.assert_close(u[0, k], model.encode_dt(batch, got[:, k])[0, -1])
        leaked = model.serving_vectors({**batch, "target_ratings": torch.full((1, 5), 1.0)})
    torch.testing.assert_close(leaked, u)
    assert not torch.allclose(u[0, 0], u[0, 2])


def test_dt_trains_end_to_end_and_its_weights_score_as_the_run():
    from fedrec.train import evaluate

    split = _rated_split(_two_kinds(30))
    cfg = TrainConfig(epochs=2, batch_size=16, progress=False, protocol="full")
    result = train("crm", split, task="next_item", model_options=DT, config=cfg)
    assert result["epochs_run"] == 2 and all(math.isfinite(v) for v in result["test"].values() if v is not None)
    model = create_model("crm", ModelData.from_split(split), DT, task="next_item")
    model.load_state_dict(result["model_state"])
    test = build_examples(split, task="next_item", stage="test", max_len=8)
    assert evaluate(model, test, task="next_item") == result["test"]


def test_dt_serving_a_higher_condition_retrieves_higher_valued_items():
    """Full-batch Adam steps (no validation selection, which serves at the mean): served at 5
    the top 5 are mostly rating-5 items, served at 1 mostly rating-1 ones."""
    split = _rated_split(_two_kinds(80))
    batch = next(iterate_batches(build_examples(split, task="next_item", stage="train", max_len=8), batch_size=1000))
    torch.manual_seed(0)
    model = create_model("crm", ModelData.from_split(split), DT, task="next_item")
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        loss, _ = model(batch, "loss")
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    values = np.full(split.n_items + 1, np.nan)
    values[1:] = np.where(split.item_raw[1:] <= 10, 5.0, 1.0)
    out = {}
    for serve in ("1", "5"):
        served = create_model("crm", ModelData.from_split(split), {**DT, "serve": serve}, task="next_item")
        served.load_state_dict(model.state_dict())
        out[serve] = _top_value(served.eval(), split, values)
    assert out["5"] > 3.5 and out["1"] < 2.5, out


def test_the_control_script_measures_crm_dt_in_the_same_shape(tmp_path, capsys):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "simulations"))
    import crm_control

    data = "synthetic:users=30,items=40,min_len=6,max_len=10,seed=0,behaviours=2"
    common = ["--data", data, "--seed", "0", "--serve", "1", "--serve", "5", "--out", str(tmp_path),
              "--set", "task=next_item", "--set", "epochs=1", "--set", "model.dim=16", "--set", "model.max-len=8"]
    assert crm_control.main([*common, "--tower", "dt"]) == 0
    doc = json.loads((tmp_path / "ml100k_crm_dt_control.json").read_text())
    assert set(doc) == {"data", "runs", "column", "summary"} and set(doc["summary"]) == {"1", "5"}
    assert set(doc["runs"]["seed0"]["serve"]["5"]) == {"hr@10", "ndcg@10", "top10_value", "hit_value", "users"}
    assert doc["runs"]["seed0"]["resolved"]["options"]["model.tower"] == "dt"
    assert crm_control.markdown(doc).startswith("CRM-DT on ")
    assert (tmp_path / "ml100k_crm_dt_control.md").read_text() == crm_control.markdown(doc)
    assert crm_control.main([*common, "--tower", "dt", "--set", "model.tower=concat"]) == 2
    assert "--tower dt and --set model.tower=concat disagree" in capsys.readouterr().err
