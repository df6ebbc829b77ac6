"""Top-k recommendations (``fedrec.recommend``): the table's shape and order, exclusion of
seen items, raw ids, the whole-history serving input, scores equal to the model's own
scoring path, the users file, the writers and loading saved models."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from fedrec.data import load_dataset
from fedrec.data.batching import build_examples, iterate_batches
from fedrec.data.split import split_dataset
from fedrec.errors import ConfigError, DataError
from fedrec.models.base import ModelData
from fedrec.models.registry import create_model
from fedrec.recommend import (
    FORMATS,
    _top_k,
    centralised_scorer,
    load_centralised,
    recommend,
    serving_batch,
    users_from_file,
    write_recommendations,
)
from fedrec.train import TrainConfig, train

CLICKS = "synthetic:users=30,items=60,seed=1"  # click logs with user and item features
SMALL = {"dim": 16, "field-dim": 4, "layers": 1, "max-len": 8, "dropout": 0.0}
MAX_LEN = 8


@pytest.fixture(scope="module")
def clicks():
    return split_dataset(load_dataset(CLICKS))


@pytest.fixture(scope="module")
def seq(tmp_path_factory):
    """A ``seq:`` file whose raw ids differ from the indices (users 1000 + 7u, items
    500 + 3j, written out of order), 14 users with 5..11 interactions each."""
    rng = np.random.default_rng(3)
    lines = []
    for u in rng.permutation(14):
        items = rng.choice(25, rng.integers(5, 12), replace=False)
        lines.append(" ".join([str(1000 + 7 * u), *(str(500 + 3 * j) for j in items)]))
    path = tmp_path_factory.mktemp("seq") / "seq.txt"
    path.write_text("\n".join(lines) + "\n")
    return split_dataset(load_dataset(f"seq:{path}"))


@pytest.fixture(scope="module")
def saved(seq, clicks, tmp_path_factory):
    """Tiny trained models, saved: SASRec next item on ``seq`` (checkpoint and resume state)
    and MRFF CTR on ``clicks`` (checkpoint)."""
    d = tmp_path_factory.mktemp("saved")
    out = {"next_ckpt": d / "next.pt", "next_state": d / "next_state.pt", "ctr_ckpt": d / "ctr.pt"}
    cfg = dict(epochs=1, batch_size=8, progress=False)
    out["next_result"] = train("sasrec", seq, task="next_item", model_options=SMALL,
                               config=TrainConfig(**cfg, checkpoint=str(out["next_ckpt"]),
                                                  resume=str(out["next_state"])))
    train("mrff", clicks, task="ctr", model_options=SMALL, config=TrainConfig(**cfg, checkpoint=str(out["ctr_ckpt"])))
    return out


def _random_scores(split, seed=0):
    """A score_fn of fixed random scores per (user, item)."""
    table = np.random.default_rng(seed).normal(size=(split.n_users + 1, split.n_items + 1))
    return lambda users: table[users]


def _seen(split) -> set[tuple[int, int]]:
    """(raw user, raw item) pairs of every interaction, in any part."""
    return set(zip(split.user_raw[split.row_user].tolist(), split.item_raw[split.item].tolist()))


# -- the table --------------------------------------------------------------------------

def test_k_rows_per_user_ranks_and_non_increasing_scores(clicks):
    frame = recommend(clicks, _random_scores(clicks), k=7, batch_size=8, progress=True)
    assert list(frame.columns) == ["user", "rank", "item", "score"]
    assert frame.dtypes.tolist() == [np.int64, np.int64, np.int64, np.float64]
    assert frame["user"].tolist() == np.repeat(clicks.user_raw[1:], 7).tolist()  # every user, in index order
    for _, rows in frame.groupby("user", sort=False):
        assert rows["rank"].tolist() == list(range(1, 8))
        assert (np.diff(rows["score"].to_numpy()) <= 0).all()
        assert rows["item"].is_unique
    assert set(frame["item"]) <= set(clicks.item_raw[1:].tolist())  # never the padding item (-1)


def test_seen_items_excluded_and_shown_without_exclusion(clicks):
    """A score_fn that scores every seen item highest: excluded, none appears; not
    excluded, the top of each list is seen items."""
    seen = clicks.seen_pairs()
    stride = clicks.n_items + 1

    def seen_first(users):
        scores = np.zeros((len(users), stride))
        keys = users[:, None] * stride + np.arange(stride)[None, :]
        scores[np.isin(keys, seen)] = 100.0
        return torch.from_numpy(scores)

    pairs = _seen(clicks)
    kept = recommend(clicks, seen_first, k=10)
    assert not any((u, i) in pairs for u, i in zip(kept["user"], kept["item"]))
    shown = recommend(clicks, seen_first, k=10, exclude_seen=False)
    assert np.array_equal(clicks.user_raw[1:], np.arange(1, clicks.n_users + 1))  # raw ids = indices here
    n_seen = np.bincount(seen // stride, minlength=clicks.n_users + 1)[1:]
    assert n_seen.min() < 10 < n_seen.max()  # some users have fewer seen items than k
    for u, rows in shown.groupby("user", sort=False):
        top = rows.head(int(n_seen[u - 1]))  # synthetic raw ids are the indices
        assert len(rows) == 10 and (top["score"] == 100.0).all()
        assert all((u, i) in pairs for i in top["item"])


def test_fewer_unseen_items_than_k_gives_what_there_is(clicks):
    frame = recommend(clicks, _random_scores(clicks), k=1000)
    stride = clicks.n_items + 1
    n_seen = np.bincount(clicks.seen_pairs() // stride, minlength=clicks.n_users + 1)[1:]
    counts = frame.groupby("user", sort=False).size().to_numpy()
    assert counts.tolist() == (clicks.n_items - n_seen).tolist()
    assert len(recommend(clicks, _random_scores(clicks), k=1000, exclude_seen=False)) == clicks.n_users * clicks.n_items


def test_ties_are_broken_by_item_index():
    """Against a full stable sort (score descending, then item index), on scores with many
    ties: the same columns, also at the k-th place where ties straddle the cut."""
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(50, 40)).astype(float)
    allowed = rng.random((50, 40)) > 0.3
    allowed[:, 0] = False
    allowed[7] = False  # a row with no candidate
    row, col, rank = _top_k(scores, allowed, 6)
    for r in range(50):
        work = np.where(allowed[r], scores[r], -np.inf)
        expect = [c for c in np.argsort(-work, kind="stable") if allowed[r, c]][:6]
        assert col[row == r].tolist() == expect
        assert rank[row == r].tolist() == list(range(1, len(expect) + 1))


def test_constant_scores_give_the_smallest_unseen_items(clicks):
    frame = recommend(clicks, lambda users: np.ones((len(users), clicks.n_items + 1)), users=np.array([3]), k=4)
    seen_items = {i for u, i in _seen(clicks) if u == clicks.user_raw[3]}
    expect = [i for i in clicks.item_raw[1:] if i not in seen_items][:4]
    assert frame["item"].tolist() == expect


def test_users_keep_their_order_and_bad_arguments_are_refused(clicks):
    frame = recommend(clicks, _random_scores(clicks), users=np.array([5, 2]), k=3)
    assert frame["user"].tolist() == [clicks.user_raw[5]] * 3 + [clicks.user_raw[2]] * 3
    assert recommend(clicks, _random_scores(clicks), users=np.array([], dtype=np.int64)).empty
    with pytest.raises(ConfigError, match="user index 31 is not in 1..30"):
        recommend(clicks, _random_scores(clicks), users=np.array([1, 31]))
    with pytest.raises(ConfigError, match="user index 0"):
        recommend(clicks, _random_scores(clicks), users=np.array([0]))
    with pytest.raises(ConfigError, match="integer user indices"):
        recommend(clicks, _random_scores(clicks), users=np.array([1.0]))
    with pytest.raises(ConfigError, match="k must be a positive integer"):
        recommend(clicks, _random_scores(clicks), k=0)
    with pytest.raises(ConfigError, match=r"shape \(30, 60\), expected \(30, 61\)"):
        recommend(clicks, lambda users: np.zeros((len(users), clicks.n_items)), batch_size=64)
    with pytest.raises(ConfigError, match="NaN score"):
        recommend(clicks, lambda users: np.full((len(users), clicks.n_items + 1), np.nan))


def test_raw_ids_round_trip(seq):
    """user and item columns are raw ids of the data; mapped back to indices they carry the
    score the score_fn gave that (user index, item index)."""
    assert not np.array_equal(seq.user_raw[1:], np.arange(1, seq.n_users + 1))  # raw ids are not indices
    score_fn = _random_scores(seq, seed=1)
    frame = recommend(seq, score_fn, k=5)
    assert set(frame["user"]) == set(seq.user_raw[1:].tolist())
    assert set(frame["item"]) <= set(seq.item_raw[1:].tolist())
    u = np.searchsorted(seq.user_raw[1:], frame["user"].to_numpy()) + 1
    i = np.searchsorted(seq.item_raw[1:], frame["item"].to_numpy()) + 1
    assert (seq.user_raw[u] == frame["user"]).all() and (seq.item_raw[i] == frame["item"]).all()
    assert np.array_equal(score_fn(u)[np.arange(len(u)), i], frame["score"].to_numpy())


# -- the serving input ----------------------------------------------------------------

@pytest.mark.parametrize("data,task", [("clicks", "ctr"), ("clicks", "next_item"), ("seq", "next_item")])
def test_serving_history_is_the_test_history_plus_the_test_item(request, data, task):
    """The whole history is what evaluation reads at test, moved on by the test interaction
    (same tokens: on click logs, next item reads clicks only)."""
    split = request.getfixturevalue(data)
    test = build_examples(split, task=task, stage="test", max_len=MAX_LEN)
    ev = next(iterate_batches(test, batch_size=len(test)))
    serve = serving_batch(split, test.users, MAX_LEN, task=task)
    assert torch.equal(serve["user"], ev["user"])
    assert torch.equal(serve["items"][:, :-1], ev["items"][:, 1:])
    assert torch.equal(serve["items"][:, -1], ev["target_items"][:, -1])
    assert torch.equal(serve["labels"][:, :-1], ev["labels"][:, 1:])
    assert torch.equal(serve["labels"][:, -1], ev["target_labels"][:, -1].long())
    assert not serve["target_mask"].any()
    if data == "clicks" and task == "next_item":
        assert (serve["labels"][serve["items"] > 0] == 1).all()
        assert len(test) < split.n_users  # some users' test impression is a non-click: still served
        assert serving_batch(split, np.arange(1, split.n_users + 1), MAX_LEN, task=task)["items"].shape == (30, MAX_LEN)


def test_serving_refuses_multi_domain_data():
    split = split_dataset(load_dataset("synthetic:users=20,items=30,domains=2,seed=0"))
    with pytest.raises(ConfigError, match="multi-domain"):
        serving_batch(split, np.array([1]), MAX_LEN, task="next_item")


# -- scores equal the model's own scoring path ---------------------------------------

def _history_batch(split, user: int, item: int, task: str) -> dict[str, torch.Tensor]:
    """The evaluation batch of one user, built by hand from the split's rows: the last
    MAX_LEN interactions of the whole history (clicks only for next item on click logs),
    left-padded, with ``item`` as the held-out target."""
    rows = np.flatnonzero(split.row_user == user)  # time-sorted
    if task == "next_item" and split.has_labels:
        rows = rows[split.label[rows] == 1]
    rows = rows[-MAX_LEN:]
    items = np.zeros(MAX_LEN, dtype=np.int64)
    labels = np.zeros(MAX_LEN, dtype=np.int64)
    items[MAX_LEN - len(rows):] = split.item[rows]
    labels[MAX_LEN - len(rows):] = split.label[rows]
    target = np.zeros(MAX_LEN, dtype=np.int64)
    target[-1] = item
    return {"user": torch.tensor([user]), "items": torch.from_numpy(items)[None],
            "labels": torch.from_numpy(labels)[None],
            "target_items": torch.from_numpy(target)[None], "target_labels": torch.zeros(1, MAX_LEN),
            "target_mask": torch.from_numpy(target > 0)[None]}


PAIRS = [(1, 1), (4, 17), (9, 60), (22, 33), (30, 5)]


def test_ctr_scores_are_the_models_predict_ctr(clicks, saved):
    model, task, max_len, _ = load_centralised(saved["ctr_ckpt"], clicks)
    assert (task, max_len) == ("ctr", MAX_LEN)
    users = np.array([u for u, _ in PAIRS])
    scores = centralised_scorer(model, clicks, task, max_len)(users)
    assert scores.shape == (len(users), clicks.n_items + 1)
    with torch.no_grad():
        for row, (user, item) in enumerate(PAIRS):
            own = model.predict_ctr(_history_batch(clicks, user, item, "ctr"))
            assert torch.allclose(scores[row, item], own[0], atol=1e-6, rtol=0)
    # item chunks of the CTR head: the same scores
    tiny = centralised_scorer(model, clicks, task, max_len, chunk_elements=100)(users)
    assert torch.allclose(tiny, scores, atol=1e-6, rtol=0)


def test_counting_baseline_ctr_scores_are_its_predict_ctr(clicks):
    model = create_model("popularity", ModelData.from_split(clicks), None, task="ctr")
    model.fit(clicks)
    scores = centralised_scorer(model, clicks, "ctr", 1)(np.array([u for u, _ in PAIRS]))
    for row, (user, item) in enumerate(PAIRS):
        batch = {"user": torch.tensor([user]), "target_items": torch.tensor([[item]])}
        assert scores[row, item] == model.predict_ctr(batch)[0]


@pytest.mark.parametrize("data", ["seq", "clicks"])
def test_next_item_scores_are_the_models_score_candidates(request, saved, data):
    split = request.getfixturevalue(data)
    if data == "seq":
        model, task, max_len, _ = load_centralised(saved["next_ckpt"], split)
    else:  # click logs: history of clicks only (a fresh model; training is irrelevant here)
        torch.manual_seed(0)
        model = create_model("sasrec", ModelData.from_split(split), SMALL, task="next_item")
        task, max_len = "next_item", MAX_LEN
    pairs = [(min(u, split.n_users), min(i, split.n_items)) for u, i in PAIRS]
    users = np.array([u for u, _ in pairs])
    scores = centralised_scorer(model, split, task, max_len)(users)
    with torch.no_grad():
        for row, (user, item) in enumerate(pairs):
            own = model.score_candidates(_history_batch(split, user, item, task), torch.tensor([[item]]))
            assert torch.allclose(scores[row, item], own[0, 0], atol=1e-5, rtol=1e-6)


# -- the users file --------------------------------------------------------------------

def test_users_file(seq, tmp_path):
    raw = seq.user_raw
    good = tmp_path / "users.txt"
    good.write_text(f"user\n{raw[3]}\n\n{raw[1]}\n{raw[3]}\n")
    assert users_from_file(good, seq).tolist() == [3, 1]
    cases = {"abc": "line 2: not an integer user id (got 'abc')", "1.5": "line 2: not an integer user id",
             "999999": "line 2: unknown user id (not in the data) (got '999999')"}
    for value, message in cases.items():
        bad = tmp_path / "bad.txt"
        bad.write_text(f"{raw[1]}\n{value}\n")
        with pytest.raises(DataError, match=str(bad) + ", " + message.replace("(", r"\(").replace(")", r"\)")):
            users_from_file(bad, seq)
    header_late = tmp_path / "late.txt"
    header_late.write_text(f"{raw[1]}\nuser\n")
    with pytest.raises(DataError, match="line 2: not an integer"):
        users_from_file(header_late, seq)
    empty = tmp_path / "empty.txt"
    empty.write_text("user\n\n")
    with pytest.raises(DataError, match="no user ids"):
        users_from_file(empty, seq)
    with pytest.raises(DataError, match="file not found"):
        users_from_file(tmp_path / "absent.txt", seq)


# -- writing ---------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", FORMATS)
def test_writer_round_trip(seq, tmp_path, suffix):
    frame = recommend(seq, _random_scores(seq), k=3)
    path = write_recommendations(frame, tmp_path / "out" / f"recs{suffix}")
    if suffix == ".csv":
        back = pd.read_csv(path)
    elif suffix == ".parquet":
        back = pd.read_parquet(path)
    else:
        back = pd.read_json(path, lines=True, precise_float=True)
        assert json.loads(path.read_text().splitlines()[0]).keys() == {"user", "rank", "item", "score"}
    pd.testing.assert_frame_equal(back, frame, check_exact=True)
    assert os.listdir(path.parent) == [path.name]  # no temporary file left
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_writer_bad_suffix_and_failure_leave_existing_files_alone(seq, tmp_path, monkeypatch):
    frame = recommend(seq, _random_scores(seq), k=2)
    accepted = r"unknown output format '\.txt' \(accepted suffixes: \.csv, \.parquet, \.jsonl\)"
    with pytest.raises(ConfigError, match=accepted):
        write_recommendations(frame, tmp_path / "recs.txt")
    assert not (tmp_path / "recs.txt").exists()
    target = tmp_path / "recs.csv"
    target.write_text("precious\n")

    def fail_midway(self, path, **kwargs):
        with open(path, "w") as handle:
            handle.write("user,rank")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        write_recommendations(frame, target)
    assert target.read_text() == "precious\n"
    assert sorted(os.listdir(tmp_path)) == ["recs.csv"]


# -- loading saved models --------------------------------------------------------------

def test_load_checkpoint_and_resume_state(seq, clicks, saved, tmp_path):
    """Both files give the run's best weights (the same recommendations); anything else,
    or another split, is a one-line error."""
    best = saved["next_result"]["model_state"]
    tables = []
    for path, kind in ((saved["next_ckpt"], "checkpoint"), (saved["next_state"], "state")):
        model, task, max_len, info = load_centralised(path, seq)
        assert (task, max_len, info["model"], info["kind"]) == ("next_item", MAX_LEN, "sasrec", kind)
        assert info["best_epoch"] == saved["next_result"]["best_epoch"] and not model.training
        assert all(torch.equal(v, best[key]) for key, v in model.state_dict().items())
        tables.append(recommend(seq, centralised_scorer(model, seq, task, max_len), k=5))
    pd.testing.assert_frame_equal(tables[0], tables[1])
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="neither a --checkpoint file nor a --resume training state"):
        load_centralised(tmp_path / "other.pt", seq)
    (tmp_path / "text.pt").write_text("not a torch file")
    with pytest.raises(ConfigError, match="not a readable checkpoint or training state"):
        load_centralised(tmp_path / "text.pt", seq)
    with pytest.raises(ConfigError, match="trained on another split"):
        load_centralised(saved["next_ckpt"], clicks)
    with pytest.raises(ConfigError, match="file not found"):
        load_centralised(tmp_path / "absent.pt", seq)
