"""RecFlow: the folder reader on files the funnel generator writes, its errors, stage samples
in the split, and stage negatives from the target's own request."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedrec.data import load_dataset
from fedrec.data.batching import build_examples, iterate_batches
from fedrec.data.samplers import StageNegativeSampler
from fedrec.data.sources.recflow import generate_recflow, write_recflow
from fedrec.data.split import TRAIN, split_dataset
from fedrec.errors import ConfigError, DataError, SpecError
from fedrec.train import TrainConfig, train

SPEC = "synthetic:kind=recflow,users=40,items=120,requests=6,candidates=40,seed=3"


@pytest.fixture(scope="module")
def frames():
    return generate_recflow(users=40, items=120, requests=6, candidates=40, seed=3)


@pytest.fixture()
def folder(tmp_path, frames):
    return write_recflow(tmp_path / "recflow", *frames, days=2)


def test_the_generator_has_recflows_columns_and_funnel(frames):
    realshow, all_stage = frames
    for col in ("request_id", "request_timestamp", "user_id", "video_id", "playing_time", "duration",
                "effective_view", "long_view", "like", "category_level_two"):
        assert col in realshow.columns
    per_request = all_stage.groupby("request_id")
    # 40 candidates a request: 3 shown, 3 cut at re-ranking, 9 at ranking, 15 at coarse, 10 at pre-ranking
    assert (per_request["realshow"].sum() == 3).all()
    assert (per_request["rerank_neg"].sum() == 3).all() and (per_request["rank_neg"].sum() == 9).all()
    assert (per_request["coarse_neg"].sum() == 15).all() and (per_request["prerank_neg"].sum() == 10).all()
    assert len(realshow) == 40 * 6 * 3
    assert ((realshow["effective_view"] == 1) == (realshow["playing_time"] >= 0.3 * realshow["duration"] - 0.5)).mean() > 0.99


def test_folder_reads_back_as_the_generator_made_it(folder):
    from_files = load_dataset(f"recflow:{folder}")
    generated = load_dataset(SPEC)

    def ordered(frame):  # the day files hold the rows in another order
        return frame.sort_values(["user", "time", "item"], kind="stable").reset_index(drop=True)

    pd.testing.assert_frame_equal(ordered(from_files.interactions.frame), ordered(generated.interactions.frame))
    pd.testing.assert_frame_equal(ordered(from_files.stage_samples), ordered(generated.stage_samples))
    pd.testing.assert_frame_equal(from_files.user_features.sort_index(), generated.user_features.sort_index())
    pd.testing.assert_frame_equal(from_files.item_features.sort_index(), generated.item_features.sort_index())
    frame = from_files.interactions.frame
    assert set(frame.columns) == {"user", "item", "time", "label", "value"}
    assert from_files.item_features.min().min() >= 1  # codes shifted: 0 is padding
    assert set(from_files.stage_samples["stage"]) == {1, 2, 3, 4}
    # another behaviour as the label; only the first day; no stage samples
    likes = load_dataset(f"recflow:{folder}?label=like&days=1&stages=false")
    assert likes.stage_samples is None and len(likes.interactions) < len(frame)
    assert likes.interactions.frame["label"].mean() < frame["label"].mean()


def test_bad_folders_and_files_are_one_line_errors(tmp_path, folder):
    with pytest.raises(DataError, match="no realshow/ folder"):
        load_dataset(f"recflow:{tmp_path}")
    with pytest.raises(DataError, match="directory not found"):
        load_dataset(f"recflow:{tmp_path / 'nowhere'}")
    with pytest.raises(SpecError):
        load_dataset(f"recflow:{folder}?label=watched")
    day = sorted((folder / "realshow").iterdir())[0]
    pd.read_feather(day).drop(columns=["playing_time"]).to_feather(day)
    with pytest.raises(DataError, match=r"missing RecFlow column.*column 'playing_time'|playing_time"):
        load_dataset(f"recflow:{folder}")
    day.write_bytes(b"not a feather file")
    with pytest.raises(DataError, match="cannot read the file"):
        load_dataset(f"recflow:{folder}")
    empty = tmp_path / "empty"
    (empty / "realshow").mkdir(parents=True)
    with pytest.raises(DataError, match="no .feather or .parquet day files"):
        load_dataset(f"recflow:{empty}")


def test_split_keeps_the_stage_samples_of_its_users_and_items():
    ds = load_dataset(SPEC)
    sp = split_dataset(ds)
    n = len(sp.stage_item)
    assert 0 < n <= len(ds.stage_samples)
    assert sp.stage_item.min() >= 1 and sp.stage_item.max() <= sp.n_items
    keys = sp.stage_user.astype(np.int64) * (10**14) + (sp.stage_time - sp.stage_time.min())
    assert (np.diff(keys) >= 0).all()  # sorted by (user, time)
    # raw ids survive the remapping
    raw = pd.DataFrame({"user": sp.user_raw[sp.stage_user], "item": sp.item_raw[sp.stage_item], "time": sp.stage_time})
    merged = raw.merge(ds.stage_samples, on=["user", "item", "time"], how="left")
    assert merged["stage"].notna().all()


def test_stage_negatives_come_from_the_targets_own_request():
    ds = load_dataset(SPEC)
    sp = split_dataset(ds)
    ex = build_examples(sp, task="next_item", stage="train", max_len=8)
    plain = next(iterate_batches(ex, batch_size=16, num_negatives=4, sampler=StageNegativeSampler(sp, seed=0, stage=2)))
    sampler = StageNegativeSampler(sp, seed=0, stage=2, unseen_only=True)
    batch = next(iterate_batches(ex, batch_size=16, num_negatives=4, sampler=sampler))
    tgt = ex.target_rows[:16]
    request = {}
    for u, t, i in zip(sp.stage_user, sp.stage_time, sp.stage_item):
        request.setdefault((int(u), int(t)), set()).add(int(i))
    neg = batch["negatives"].numpy()
    trained = {}
    for r in np.flatnonzero(sp.part == TRAIN):
        trained.setdefault(int(sp.row_user[r]), set()).add(int(sp.item[r]))
    checked = from_request = 0
    for b in range(neg.shape[0]):
        for t in range(neg.shape[1]):
            row = tgt[b, t]
            if row < 0:
                assert (neg[b, t] == 0).all()
                continue
            user = int(sp.row_user[row])
            own = request.get((user, int(sp.time[row])), set())
            assert own
            for item in neg[b, t].tolist():
                assert item not in trained[user]  # never an item the user consumed in training
            from_request += sum(item in own for item in neg[b, t, :2].tolist())
            checked += 1
    assert checked > 20
    # the two stage columns come from the request, but for picks the user consumed elsewhere
    assert from_request > 1.5 * checked
    # RecFlow's baseline (the default) keeps every pick from the request, consumed or not
    for b in range(16):
        for t in range(8):
            row = tgt[b, t]
            if row >= 0:
                own = request[(int(sp.row_user[row]), int(sp.time[row]))]
                assert set(plain["negatives"][b, t, :2].tolist()) <= own
    with pytest.raises(ConfigError, match="stage-negatives needs data with stage samples"):
        StageNegativeSampler(split_dataset(load_dataset("synthetic:users=20,items=30,seed=0")), seed=0, stage=1)


@pytest.mark.parametrize("options, message", [
    ({"stage_negatives": -1}, "'stage-negatives' must be >= 0"),
    ({"stage_min": 5}, "'stage-min' must be in 1..4"),
    ({"stage_loss": "pairwise"}, "'stage-loss' must be one of bce, fsltr"),
    ({"stage_weight": 0.0}, "'stage-weight' must be > 0"),
])
def test_stage_options_are_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options)


def test_stage_aware_training_runs_and_differs_from_exposure_only():
    sp = split_dataset(load_dataset(SPEC))
    options = {"dim": 16, "max-len": 8, "next-loss": "bce"}
    base = TrainConfig(epochs=2, negatives=4, progress=False, protocol="full")
    a = train("sasrec", sp, task="next_item", model_options=options, config=base)
    b = train("sasrec", sp, task="next_item", model_options=options,
              config=TrainConfig(epochs=2, negatives=4, stage_negatives=2, progress=False, protocol="full"))
    assert a["test"] != b["test"]
    assert b["train"]["stage_negatives"] == 2
    with pytest.raises(ConfigError, match=r"'stage-negatives' must be in 0..negatives \(4\)"):
        train("sasrec", sp, task="next_item", model_options=options,
              config=TrainConfig(epochs=1, negatives=4, stage_negatives=5, progress=False))


def test_crm_conditions_on_the_watch_time():
    from fedrec.models.base import ModelData
    from fedrec.models.registry import create_model

    sp = split_dataset(load_dataset(SPEC))
    assert sp.value is not None and np.isfinite(sp.value[sp.part == TRAIN]).all()
    model = create_model("crm", ModelData.from_split(sp), {"dim": 16, "max-len": 8}, task="next_item")
    assert model.column == "value"
