"""Tests for fedrec.data.batching: the ctr / next_item / cdr example windows, negatives and
candidates, full-ranking exclusions, shuffling and batch sizes, and the errors on bad
arguments.

Small hand-written tables; window contents are checked against hand-worked expectations
(in raw ids, mapped back through ``SplitData.item_raw``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from fedrec.data import Dataset, Interactions
from fedrec.data.batching import build_examples, iterate_batches
from fedrec.data.samplers import UniformNegativeSampler
from fedrec.data.split import TRAIN, split_dataset
from fedrec.errors import ConfigError


def _split(rows: dict):
    frame = pd.DataFrame(rows)
    return split_dataset(Dataset(name="t", interactions=Interactions.from_frame(frame, source="t"))), frame


def _one_batch(examples, **kwargs) -> dict:
    batches = list(iterate_batches(examples, batch_size=max(len(examples), 1), **kwargs))
    assert len(batches) == 1
    return {k: v.numpy() for k, v in batches[0].items()}


def _raw(sp, idx: np.ndarray) -> list:
    """Raw ids of item indices, 0 (padding) kept as 0."""
    idx = np.asarray(idx)
    return np.where(idx > 0, sp.item_raw[idx], 0).tolist()


def _row_of_user(batch: dict, sp, raw_user: int) -> int:
    (i,) = np.flatnonzero(sp.user_raw[batch["user"]] == raw_user)
    return int(i)


# -- ctr windows, hand case -------------------------------------------------------------

# user 1: train a..e = 11..15, valid 16, test 17
# user 2: train 21, 22, valid 23, test 24
# user 3: train 31 (one training row), valid 32, test 33
CTR = {
    "user": [1] * 7 + [2] * 4 + [3] * 3,
    "item": [11, 12, 13, 14, 15, 16, 17, 21, 22, 23, 24, 31, 32, 33],
    "time": list(range(7)) + list(range(4)) + list(range(3)),
    "label": [1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1, 0, 1],
}
LABEL = dict(zip(CTR["item"], CTR["label"]))


def test_ctr_train_window_shifts_by_one_over_the_last_training_rows():
    sp, _ = _split(CTR)
    ex = build_examples(sp, task="ctr", stage="train", max_len=3)
    b = _one_batch(ex)
    assert sorted(sp.user_raw[b["user"]].tolist()) == [1, 2]  # user 3 has no pair to learn from
    i = _row_of_user(b, sp, 1)
    assert _raw(sp, b["items"][i]) == [12, 13, 14]
    assert _raw(sp, b["target_items"][i]) == [13, 14, 15]
    assert b["labels"][i].tolist() == [LABEL[x] for x in (12, 13, 14)]
    assert b["target_labels"][i].tolist() == [LABEL[x] for x in (13, 14, 15)]
    assert b["target_mask"][i].tolist() == [True, True, True]
    assert b["target_labels"].dtype == np.float32 and b["labels"].dtype == np.int64


def test_ctr_train_window_left_pads_a_short_user():
    sp, _ = _split(CTR)
    b = _one_batch(build_examples(sp, task="ctr", stage="train", max_len=3))
    i = _row_of_user(b, sp, 2)
    assert _raw(sp, b["items"][i]) == [0, 0, 21]
    assert _raw(sp, b["target_items"][i]) == [0, 0, 22]
    assert b["target_mask"][i].tolist() == [False, False, True]
    assert b["labels"][i].tolist() == [0, 0, LABEL[21]]
    assert b["target_labels"][i].tolist() == [0.0, 0.0, float(LABEL[22])]


def test_ctr_single_training_row_gives_no_training_example():
    sp, _ = _split(CTR)
    ex = build_examples(sp, task="ctr", stage="train", max_len=3)
    assert len(ex) == 2
    assert 3 not in sp.user_raw[ex.users].tolist()


def test_valid_window_uses_train_history_and_targets_the_last_column():
    sp, _ = _split(CTR)
    ex = build_examples(sp, task="ctr", stage="valid", max_len=3)
    b = _one_batch(ex)
    expected = {1: ([13, 14, 15], 16), 2: ([0, 21, 22], 23), 3: ([0, 0, 31], 32)}
    assert len(ex) == 3
    for user, (hist, target) in expected.items():
        i = _row_of_user(b, sp, user)
        assert _raw(sp, b["items"][i]) == hist
        assert _raw(sp, b["target_items"][i]) == [0, 0, target]
        assert b["target_mask"][i].tolist() == [False, False, True]
        assert b["target_labels"][i].tolist() == [0.0, 0.0, float(LABEL[target])]


def test_test_window_history_includes_the_valid_row():
    sp, _ = _split(CTR)
    b = _one_batch(build_examples(sp, task="ctr", stage="test", max_len=3))
    expected = {1: ([14, 15, 16], 17), 2: ([21, 22, 23], 24), 3: ([0, 31, 32], 33)}
    for user, (hist, target) in expected.items():
        i = _row_of_user(b, sp, user)
        assert _raw(sp, b["items"][i]) == hist
        assert _raw(sp, b["target_items"][i]) == [0, 0, target]
        assert b["labels"][i].tolist() == [LABEL[x] if x else 0 for x in hist]


# -- next_item: negatives and candidates ---------------------------------------------------


def _random_rows(n_users: int = 25, n_items: int = 40, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rows = {"user": [], "item": [], "time": []}
    for u in range(1, n_users + 1):
        length = int(rng.integers(3, 15))
        items = rng.choice(np.arange(1, n_items + 1), size=length, replace=True)  # repeats allowed
        rows["user"] += [u] * length
        rows["item"] += items.tolist()
        rows["time"] += rng.permutation(length).tolist()
    return rows


def _seen_raw(frame: pd.DataFrame) -> dict[int, set[int]]:
    return frame.groupby("user")["item"].agg(lambda s: set(s.tolist())).to_dict()


def test_next_item_training_negatives_are_unseen_and_zero_on_padding():
    sp, frame = _split(_random_rows())
    seen = _seen_raw(frame)
    ex = build_examples(sp, task="next_item", stage="train", max_len=8)
    sampler = UniformNegativeSampler(sp, seed=1)
    b = _one_batch(ex, num_negatives=5, sampler=sampler)
    neg, mask = b["negatives"], b["target_mask"]
    assert neg.shape == (len(ex), 8, 5)
    assert (~mask).any() and mask.any()  # the case exercises padding
    assert np.all(neg[~mask] == 0)
    assert np.all(neg[mask] > 0)
    for i, u in enumerate(sp.user_raw[b["user"]]):
        drawn = set(sp.item_raw[neg[i][mask[i]]].ravel().tolist())
        assert not drawn & seen[int(u)]


def test_next_item_evaluation_candidates_hold_the_target_then_unseen_items():
    sp, frame = _split(_random_rows())
    seen = _seen_raw(frame)
    for stage in ("valid", "test"):
        ex = build_examples(sp, task="next_item", stage=stage, max_len=8)
        b = _one_batch(ex, num_negatives=7, sampler=UniformNegativeSampler(sp, seed=2))
        cand = b["candidates"]
        assert cand.shape == (len(ex), 8)
        assert np.array_equal(cand[:, 0], b["target_items"][:, -1])
        assert "negatives" not in b
        for i, u in enumerate(sp.user_raw[b["user"]]):
            assert not set(sp.item_raw[cand[i, 1:]].tolist()) & seen[int(u)]


def test_negatives_depend_only_on_the_sampler_seed():
    sp, _ = _split(_random_rows())
    ex = build_examples(sp, task="next_item", stage="train", max_len=8)

    def draw(seed):
        return _one_batch(ex, num_negatives=4, sampler=UniformNegativeSampler(sp, seed=seed))["negatives"]

    assert np.array_equal(draw(5), draw(5))
    assert not np.array_equal(draw(5), draw(6))


def test_num_negatives_without_sampler_raises_config_error():
    sp, _ = _split(_random_rows())
    ex = build_examples(sp, task="next_item", stage="train", max_len=8)
    with pytest.raises(ConfigError, match="sampler"):
        next(iterate_batches(ex, batch_size=4, num_negatives=3))


# -- exclusions ---------------------------------------------------------------------------


def _expected_exclusions(frame: pd.DataFrame, stage: str) -> dict[int, set[int]]:
    """Per raw user, the raw items of earlier splits, computed directly with pandas."""
    f = frame.sort_values(["user", "time"], kind="stable").copy()
    n = f.groupby("user")["item"].transform("size")
    pos = f.groupby("user").cumcount()
    f["part"] = np.select([pos == n - 1, pos == n - 2], [2, 1], 0)
    earlier = {"train": 0, "valid": 1, "test": 2}[stage]
    kept = f[(n >= 3) & (f["part"] < earlier)]
    out = {int(u): set() for u in f.loc[n >= 3, "user"]}
    for u, items in kept.groupby("user")["item"]:
        out[int(u)] = set(items.tolist())
    return out


@pytest.mark.parametrize("stage", ["train", "valid", "test"])
def test_exclusions_are_exactly_the_users_earlier_split_items(stage):
    rows = _random_rows(seed=4)
    sp, frame = _split(rows)
    expected = _expected_exclusions(frame, stage)
    ex = build_examples(sp, task="next_item", stage=stage, max_len=5)
    indptr, indices = ex.exclusions()
    assert indptr.shape == (len(ex) + 1,) and indptr[0] == 0 and indptr[-1] == len(indices)
    for i, u in enumerate(sp.user_raw[ex.users]):
        got = sp.item_raw[indices[indptr[i] : indptr[i + 1]]].tolist()
        assert len(got) == len(set(got))  # unique
        assert set(got) == expected[int(u)]


def test_exclusions_for_test_include_the_valid_item_but_not_the_test_item():
    sp, _ = _split(CTR)
    ex = build_examples(sp, task="ctr", stage="test", max_len=3)
    indptr, indices = ex.exclusions()
    i = int(np.flatnonzero(sp.user_raw[ex.users] == 1)[0])
    assert sorted(sp.item_raw[indices[indptr[i] : indptr[i + 1]]].tolist()) == [11, 12, 13, 14, 15, 16]


# -- cdr ----------------------------------------------------------------------------------

# Two domains with the files' own split. Items 1xx in domain A, 2xx in domain B.
# user 1: A train 101, 102, 102 (twice), 103, 104 ; valid 105 ; test 106
#         B train 201, 202, 203 ; valid 204 ; test 205
# user 2: A train 101, 103 ; test 107           (no B rows)
# user 3: B train 202, 206 ; valid 207 ; test 201   (no A rows)
# user 4: A train 108 ; B train 208, 209         (only one A training row)
CDR_ROWS = [
    (1, 101, 1, "A", "train"), (1, 102, 2, "A", "train"), (1, 102, 3, "A", "train"), (1, 103, 4, "A", "train"),
    (1, 104, 5, "A", "train"), (1, 105, 6, "A", "valid"), (1, 106, 7, "A", "test"),
    (1, 201, 1, "B", "train"), (1, 202, 2, "B", "train"), (1, 203, 3, "B", "train"), (1, 204, 4, "B", "valid"),
    (1, 205, 5, "B", "test"),
    (2, 101, 1, "A", "train"), (2, 103, 2, "A", "train"), (2, 107, 3, "A", "test"),
    (3, 202, 1, "B", "train"), (3, 206, 2, "B", "train"), (3, 207, 3, "B", "valid"), (3, 201, 4, "B", "test"),
    (4, 108, 1, "A", "train"), (4, 208, 1, "B", "train"), (4, 209, 2, "B", "train"),
]
CDR = dict(zip(["user", "item", "time", "domain", "split"], map(list, zip(*CDR_ROWS))))


def _cdr_train_items(frame: pd.DataFrame, user: int, domain: str | None, other: bool = False) -> list[int]:
    f = frame[(frame["user"] == user) & (frame["split"] == "train")]
    f = f[f["domain"] != domain] if other else f[f["domain"] == domain]
    return f["item"].tolist()


@pytest.mark.parametrize("max_len", [2, 4, 6])
@pytest.mark.parametrize("stage", ["train", "valid", "test"])
def test_cdr_contexts_come_from_the_right_training_rows(stage, max_len):
    sp, frame = _split(CDR)
    assert sp.method == "files"
    seen = _seen_raw(frame)
    ex = build_examples(sp, task="cdr", stage=stage, max_len=max_len)
    assert len(ex) == int((frame["split"] == stage).sum())
    # training batches carry sampled negatives; evaluation batches carry candidates instead
    # (distinct unseen items: more than this tiny catalogue has, so none are asked for there)
    n_neg = 3 if stage == "train" else 0
    for seed in range(5):
        b = _one_batch(ex, seed=seed, num_negatives=n_neg, sampler=UniformNegativeSampler(sp, seed=seed))
        assert b["own_items"].shape == (len(ex), max_len)
        assert b["other_items"].shape == (len(ex), max_len)
        if n_neg:
            assert b["negatives"].shape == (len(ex), 3)
        assert b["target_mask"].shape == (len(ex), 1) and b["target_mask"].all()
        for i in range(len(ex)):
            user = int(sp.user_raw[b["user"][i]])
            domain = sp.domains[b["domain"][i]]
            positive = int(sp.item_raw[b["target_items"][i, 0]])
            own_pool = Counter(_cdr_train_items(frame, user, domain))
            own_pool.pop(positive, None)  # the positive item never appears in its own context
            own = [x for x in _raw(sp, b["own_items"][i]) if x]
            assert not Counter(own) - own_pool
            assert len(own) == min(max_len, sum(own_pool.values()))
            assert all(x == 0 for x in _raw(sp, b["own_items"][i])[len(own) :])
            other_pool = Counter(_cdr_train_items(frame, user, domain, other=True))
            other = [x for x in _raw(sp, b["other_items"][i]) if x]
            assert not Counter(other) - other_pool
            assert len(other) == min(max_len, sum(other_pool.values()))
            # contexts are in time (file) order
            history = _cdr_train_items(frame, user, domain)
            if len(set(history)) == len(history):
                positions = [history.index(x) for x in own]
                assert positions == sorted(positions)
            if n_neg:
                negs = sp.item_raw[b["negatives"][i]]
                assert set(sp.item_domain[b["negatives"][i]].tolist()) == {b["domain"][i]}
                assert not set(negs.tolist()) & seen[user]


def test_cdr_own_context_excludes_every_row_of_the_positive_item():
    sp, frame = _split(CDR)
    ex = build_examples(sp, task="cdr", stage="train", max_len=10)
    b = _one_batch(ex, seed=0)
    rows = [
        i for i in range(len(ex))
        if sp.user_raw[b["user"][i]] == 1 and sp.item_raw[b["target_items"][i, 0]] == 102
    ]
    assert len(rows) == 2  # 102 appears twice in user 1's A training rows
    for i in rows:  # neither of its two rows may leak the answer into the context
        assert sorted(x for x in _raw(sp, b["own_items"][i]) if x) == [101, 103, 104]
    # the user with a single A training row gets an empty own context there
    (i,) = [i for i in range(len(ex)) if sp.user_raw[b["user"][i]] == 4 and sp.domains[b["domain"][i]] == "A"]
    assert _raw(sp, b["own_items"][i]) == [0] * 10
    assert sorted(x for x in _raw(sp, b["other_items"][i]) if x) == [208, 209]


def test_cdr_contexts_are_redrawn_with_the_seed():
    sp, _ = _split(CDR)
    ex = build_examples(sp, task="cdr", stage="train", max_len=2)
    own = [_one_batch(ex, seed=s)["own_items"] for s in range(6)]
    assert np.array_equal(own[0], _one_batch(ex, seed=0)["own_items"])
    assert any(not np.array_equal(own[0], o) for o in own[1:])


def test_cdr_on_single_domain_data_raises_config_error():
    sp, _ = _split(CTR)
    with pytest.raises(ConfigError, match="multi-domain"):
        build_examples(sp, task="cdr", stage="train", max_len=3)


# -- shuffling, batch sizes, argument errors ------------------------------------------------


def test_batches_cover_every_example_once_in_order_without_shuffle():
    sp, _ = _split(_random_rows(n_users=20))
    ex = build_examples(sp, task="next_item", stage="valid", max_len=4)
    assert len(ex) == 20
    batches = list(iterate_batches(ex, batch_size=6))
    assert [len(b["user"]) for b in batches] == [6, 6, 6, 2]
    users = np.concatenate([b["user"].numpy() for b in batches])
    assert users.tolist() == ex.users.tolist()
    assert all(b["items"].shape == (len(b["user"]), 4) for b in batches)


def test_shuffle_is_a_seeded_permutation():
    sp, _ = _split(_random_rows(n_users=20))
    ex = build_examples(sp, task="next_item", stage="valid", max_len=4)

    def order(seed):
        return np.concatenate([b["user"].numpy() for b in iterate_batches(ex, batch_size=6, shuffle=True, seed=seed)])

    a, b, c = order(1), order(1), order(2)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    for o in (a, c):
        assert sorted(o.tolist()) == sorted(ex.users.tolist())  # each example exactly once
    assert not np.array_equal(a, ex.users)


@pytest.mark.parametrize("batch_size", [0, -3])
def test_bad_batch_size_raises_config_error(batch_size):
    sp, _ = _split(CTR)
    ex = build_examples(sp, task="ctr", stage="train", max_len=3)
    with pytest.raises(ConfigError, match="batch_size"):
        next(iterate_batches(ex, batch_size=batch_size))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"task": "rank", "stage": "train", "max_len": 3}, "task"),
        ({"task": "ctr", "stage": "eval", "max_len": 3}, "stage"),
        ({"task": "ctr", "stage": "train", "max_len": 0}, "max_len"),
    ],
)
def test_unknown_task_stage_or_bad_max_len_raises_config_error(kwargs, match):
    sp, _ = _split(CTR)
    with pytest.raises(ConfigError, match=match):
        build_examples(sp, **kwargs)


def test_example_rows_are_training_rows_for_the_train_stage():
    sp, _ = _split(CTR)
    ex = build_examples(sp, task="next_item", stage="train", max_len=3)
    for rows in (ex.input_rows, ex.target_rows):
        real = rows[rows >= 0]
        assert np.all(sp.part[real] == TRAIN)


# -- review fixes: positives only, no leaking histories, fixed candidates, shards -------------


def _frame_split(rows: dict):
    frame = pd.DataFrame(rows)
    return split_dataset(Dataset("t", Interactions.from_frame(frame, source="t")))


def test_next_item_on_click_logs_uses_only_clicks_as_targets_and_history():
    # user 1: clicks 11, 13, 15 and non-clicks 12, 14; the test impression (16) is a non-click
    # user 2: test impression 23 is a click
    sp = _frame_split({
        "user": [1] * 6 + [2] * 4,
        "item": [11, 12, 13, 14, 15, 16, 21, 22, 24, 23],
        "time": list(range(6)) + list(range(4)),
        "label": [1, 0, 1, 0, 1, 0, 1, 1, 1, 1],
    })
    train = build_examples(sp, task="next_item", stage="train", max_len=4)
    b = _one_batch(train, seed=0)
    i = int(np.flatnonzero(sp.user_raw[np.asarray(b["user"])] == 1)[0])
    assert sp.item_raw[b["items"][i]].tolist() == [-1, -1, -1, 11]  # -1 = padding's raw id
    assert [x for x in sp.item_raw[b["target_items"][i]].tolist() if x > 0] == [13]
    assert (np.asarray(b["target_labels"])[np.asarray(b["target_mask"])] == 1).all()
    test = build_examples(sp, task="next_item", stage="test", max_len=4)
    assert sp.user_raw[test.users].tolist() == [2]  # user 1's held-out impression is a non-click
    assert set(sp.item_raw[sp.item[test.input_rows[0][test.input_rows[0] >= 0]]].tolist()) <= {21, 22, 24}
    # ctr keeps every impression
    assert len(build_examples(sp, task="ctr", stage="test", max_len=4)) == 2


def test_files_split_evaluation_history_is_training_rows_only():
    # UniCDR-style: the validation rows duplicate the test rows; they must not enter the history
    sp = _frame_split({
        "user": [1, 1, 1, 1], "item": [1, 2, 9, 9], "time": [0, 1, 2, 3],
        "split": ["train", "train", "valid", "test"],
    })
    test = build_examples(sp, task="next_item", stage="test", max_len=3)
    history = sp.item_raw[sp.item[test.input_rows[0][test.input_rows[0] >= 0]]].tolist()
    assert history == [1, 2]
    indptr, indices = test.exclusions()
    assert sorted(sp.item_raw[indices].tolist()) == [1, 2]


def test_sampled_candidates_do_not_depend_on_batch_size_or_sampler_history():
    sp = _frame_split({"user": [1] * 5 + [2] * 5, "item": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] ,
                       "time": list(range(5)) * 2})
    ex = build_examples(sp, task="next_item", stage="test", max_len=3)
    used = UniformNegativeSampler(sp, seed=7)
    used.sample(np.array([1, 2]), 50)  # a training epoch moved this sampler's generator
    big = next(iterate_batches(ex, batch_size=10, num_negatives=4, sampler=UniformNegativeSampler(sp, seed=7)))
    small = list(iterate_batches(ex, batch_size=1, num_negatives=4, sampler=used))
    torch.testing.assert_close(big["candidates"], torch.cat([s["candidates"] for s in small]))
    torch.testing.assert_close(big["candidates"][:, 0], big["target_items"][:, -1])


def test_subset_keeps_only_a_clients_users():
    sp = _frame_split({"user": [1] * 4 + [2] * 4 + [3] * 4, "item": list(range(1, 13)), "time": list(range(4)) * 3})
    ex = build_examples(sp, task="ctr", stage="train", max_len=3)
    shard = ex.subset(np.array([1, 3]))
    assert sorted(shard.users.tolist()) == [1, 3]
    np.testing.assert_array_equal(shard.input_rows, ex.input_rows[np.isin(ex.users, [1, 3])])
    assert len(ex.subset(np.array([], dtype=np.int64))) == 0


def test_numpy_integers_are_accepted_as_sizes_and_empty_exclusions_work():
    sp = _frame_split({"user": [1] * 4, "item": [1, 2, 3, 4], "time": [0, 1, 2, 3]})
    assert len(build_examples(sp, task="ctr", stage="train", max_len=np.int64(3))) == 1
    draws = UniformNegativeSampler(sp, seed=0, exclude_parts=()).sample(np.array([1]), 5)
    assert draws.shape == (1, 5) and (draws >= 1).all()


def test_shard_exclusions_equal_the_full_sets_rows_for_those_users():
    sp = _frame_split({"user": [1] * 5 + [2] * 4 + [3] * 6, "item": [1, 2, 3, 4, 5, 2, 6, 7, 8, 1, 3, 5, 7, 9, 10],
                       "time": list(range(5)) + list(range(4)) + list(range(6))})
    full = build_examples(sp, task="next_item", stage="test", max_len=3)
    f_ptr, f_idx = full.exclusions()
    for user in (1, 3):
        s_ptr, s_idx = full.subset(np.array([user])).exclusions()  # reuses the split's cached keys
        i = int(np.flatnonzero(full.users == user)[0])
        np.testing.assert_array_equal(s_idx, f_idx[f_ptr[i] : f_ptr[i + 1]])
