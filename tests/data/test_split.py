"""Tests for fedrec.data.split: stable leave-last-two-out, dropping short sequences, id
remapping with 0 reserved for padding, the files' own split, multi-domain sequences, and
alignment of the side tables (features, groups) with the remapped indices.

Every case is a tiny hand-written table whose expected result is worked out by hand.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedrec.data import Dataset, Interactions
from fedrec.data.split import TEST, TRAIN, VALID, SplitConfig, split_dataset
from fedrec.errors import ConfigError, DataError


def _dataset(rows: dict, **side) -> Dataset:
    return Dataset(name="t", interactions=Interactions.from_frame(pd.DataFrame(rows), source="t"), **side)


def _seq_of(sp, raw_user: int, domain: int = -1) -> int:
    user = int(np.flatnonzero(sp.user_raw == raw_user)[0])
    (s,) = np.flatnonzero((sp.seq_user == user) & (sp.seq_domain == domain))
    return int(s)


def _parts(sp, s: int) -> list[int]:
    return sp.part[sp.indptr[s] : sp.indptr[s + 1]].tolist()


# -- leave-last-two-out ---------------------------------------------------------------

# File order is deliberately not time order, and several timestamps tie.
#   user 10: t1:100, t3:300, t3:200, t5:500, t5:400  -> train [100, 300, 200], valid 500, test 400
#   user 3:  t0:60, t1:30, t2:40, t2:20, t9:50       -> train [60, 30, 40], valid 20, test 50
#   user 7:  t3:70, t3:80, t3:90 (all tied)          -> train [70], valid 80, test 90
TIES = {
    "user": [10, 3, 10, 10, 3, 10, 3, 10, 3, 7, 3, 7, 7],
    "item": [500, 40, 100, 300, 20, 200, 30, 400, 50, 70, 60, 80, 90],
    "time": [5, 2, 1, 3, 2, 3, 1, 5, 9, 3, 0, 3, 3],
}


def test_leave_last_two_out_ties_keep_file_order():
    sp = split_dataset(_dataset(TIES))
    assert sp.method == "leave-last-two-out"
    expected = {
        3: ([60, 30, 40], [20], [50]),
        7: ([70], [80], [90]),
        10: ([100, 300, 200], [500], [400]),
    }
    for raw, (train, valid, test) in expected.items():
        s = _seq_of(sp, raw)
        assert sp.sequence_items(s).tolist() == train  # default parts: train only
        assert sp.sequence_items(s, (VALID,)).tolist() == valid
        assert sp.sequence_items(s, (TEST,)).tolist() == test
        assert sp.sequence_items(s, (TRAIN, VALID, TEST)).tolist() == train + valid + test
        assert _parts(sp, s) == [TRAIN] * len(train) + [VALID, TEST]


def test_leave_last_two_out_rows_sorted_by_time_with_remapped_items():
    sp = split_dataset(_dataset(TIES))
    # items sorted by raw id -> 1..13
    assert sp.item_raw.tolist() == [-1, 20, 30, 40, 50, 60, 70, 80, 90, 100, 200, 300, 400, 500]
    s = _seq_of(sp, 3)
    rows = slice(sp.indptr[s], sp.indptr[s + 1])
    assert sp.item[rows].tolist() == [5, 2, 3, 1, 4]  # raw 60, 30, 40, 20, 50
    assert sp.time[rows].tolist() == [0, 1, 2, 2, 9]
    assert np.all(np.diff(sp.time[rows]) >= 0)
    assert sp.part_counts() == {"train": 7, "valid": 3, "test": 3}
    # no labels in the file: every row an implicit positive
    assert not sp.has_labels
    assert sp.label.tolist() == [1] * 13


def test_sequence_labels_follow_time_order():
    rows = {"user": [1, 1, 1, 1], "item": [4, 3, 2, 1], "time": [4, 3, 2, 1], "label": [0, 1, 1, 0]}
    sp = split_dataset(_dataset(rows))
    assert sp.has_labels
    assert sp.sequence_items(0).tolist() == [1, 2]
    assert sp.sequence_labels(0).tolist() == [0, 1]
    assert sp.sequence_labels(0, (VALID, TEST)).tolist() == [1, 0]


# -- dropping short sequences -----------------------------------------------------------

# user 1: 5 rows, user 2: 2 rows, user 3: 4 rows, user 4: 3 rows, user 5: 2 rows
SHORT = {
    "user": [1] * 5 + [2] * 2 + [3] * 4 + [4] * 3 + [5] * 2,
    "item": [1, 2, 3, 4, 5, 90, 91, 1, 2, 3, 6, 7, 8, 9, 92, 93],
    "time": [1, 2, 3, 4, 5, 1, 2, 1, 2, 3, 4, 1, 2, 3, 1, 2],
}


def test_users_below_default_min_interactions_are_dropped():
    sp = split_dataset(_dataset(SHORT))
    assert sp.user_raw.tolist() == [-1, 1, 3, 4]
    assert sp.n_users == 3
    # items seen only by dropped users are gone too
    assert sp.item_raw.tolist() == [-1, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert [_parts(sp, s) for s in range(sp.n_sequences)] == [
        [TRAIN, TRAIN, TRAIN, VALID, TEST],
        [TRAIN, TRAIN, VALID, TEST],
        [TRAIN, VALID, TEST],
    ]


def test_larger_min_interactions_drops_more():
    sp = split_dataset(_dataset(SHORT), SplitConfig(min_interactions=5))
    assert sp.user_raw.tolist() == [-1, 1]
    assert sp.item_raw.tolist() == [-1, 1, 2, 3, 4, 5]
    assert _parts(sp, 0) == [TRAIN, TRAIN, TRAIN, VALID, TEST]


def test_min_interactions_two_keeps_a_valid_and_test_only_user():
    sp = split_dataset(_dataset(SHORT), SplitConfig(min_interactions=2))
    assert sp.n_users == 5
    assert _parts(sp, _seq_of(sp, 2)) == [VALID, TEST]
    assert _parts(sp, _seq_of(sp, 1)) == [TRAIN, TRAIN, TRAIN, VALID, TEST]


def test_nothing_left_after_dropping_raises_data_error():
    with pytest.raises(DataError, match="at least 6"):
        split_dataset(_dataset(SHORT), SplitConfig(min_interactions=6))


@pytest.mark.parametrize(
    "rows",
    [
        # singleton user 2 between two kept users
        {"user": [1, 1, 1, 1, 2, 3, 3, 3], "item": [1, 2, 3, 4, 5, 6, 7, 8], "time": [1, 2, 3, 4, 1, 1, 2, 3]},
        # singleton user 1 first: corrupts the last row of the table (user 2's test row)
        {"user": [1, 2, 2, 2], "item": [1, 2, 3, 4], "time": [1, 2, 3, 4]},
    ],
    ids=["singleton-in-the-middle", "singleton-first"],
)
def test_dropped_single_interaction_user_does_not_change_other_users_split(rows):
    sp = split_dataset(_dataset(rows))
    for s in range(sp.n_sequences):
        parts = _parts(sp, s)
        assert parts[-2:] == [VALID, TEST], (sp.user_raw[sp.seq_user[s]], parts)


def test_min_interactions_one_keeps_a_singleton_as_test_without_touching_others():
    rows = {"user": [1, 1, 1, 2, 3, 3, 3], "item": [1, 2, 3, 4, 5, 6, 7], "time": [1, 2, 3, 1, 1, 2, 3]}
    sp = split_dataset(_dataset(rows), SplitConfig(min_interactions=1))
    assert [_parts(sp, s) for s in range(sp.n_sequences)] == [
        [TRAIN, VALID, TEST],
        [TEST],
        [TRAIN, VALID, TEST],
    ]


# -- id remapping ---------------------------------------------------------------------


def test_raw_user_ids_map_to_one_based_indices_in_increasing_raw_order():
    sp = split_dataset(_dataset(TIES))
    assert sp.user_raw.tolist() == [-1, 3, 7, 10]
    assert sp.user_raw[0] == -1 and sp.item_raw[0] == -1
    assert sp.seq_user.tolist() == [1, 2, 3]
    # every row's user index points back at its raw user
    raw_by_row = sp.user_raw[sp.row_user]
    assert sorted(raw_by_row.tolist()) == sorted(TIES["user"])
    assert sp.n_users == 3 and sp.n_items == 13


def test_item_index_zero_is_never_a_real_item():
    sp = split_dataset(_dataset(TIES))
    assert sp.item.min() == 1
    assert set(sp.item.tolist()) == set(range(1, sp.n_items + 1))
    assert np.all(np.diff(sp.item_raw[1:]) > 0)  # increasing raw order
    assert sp.item_domain.tolist() == [-1] * (sp.n_items + 1)  # single-domain
    assert sp.domains == [] and sp.seq_domain.tolist() == [-1, -1, -1]


# -- split method ---------------------------------------------------------------------

# file order differs from time order; the split column travels with its row
FILES = {
    "user": [2, 1, 1, 1, 2, 1, 2],
    "item": [13, 3, 1, 2, 11, 4, 12],
    "time": [30, 3, 1, 2, 10, 4, 20],
    "split": ["test", "valid", "train", "train", "train", "test", "train"],
}


def test_auto_uses_the_files_split_when_present():
    sp = split_dataset(_dataset(FILES))
    assert sp.method == "files"
    s1, s2 = _seq_of(sp, 1), _seq_of(sp, 2)
    assert sp.sequence_items(s1, (TRAIN, VALID, TEST)).tolist() == [1, 2, 3, 4]
    assert _parts(sp, s1) == [TRAIN, TRAIN, VALID, TEST]
    # user 2 has no valid row in the files, and keeps all 3 rows
    assert sp.sequence_items(s2, (TRAIN, VALID, TEST)).tolist() == [11, 12, 13]
    assert _parts(sp, s2) == [TRAIN, TRAIN, TEST]


def test_explicit_leave_last_two_out_ignores_the_files_split():
    sp = split_dataset(_dataset(FILES), SplitConfig(method="leave-last-two-out"))
    assert sp.method == "leave-last-two-out"
    assert _parts(sp, _seq_of(sp, 2)) == [TRAIN, VALID, TEST]


def test_files_method_without_a_split_column_raises_config_error():
    with pytest.raises(ConfigError, match="files"):
        split_dataset(_dataset(TIES), SplitConfig(method="files"))


@pytest.mark.parametrize("kwargs", [{"method": "random"}, {"min_interactions": 0}, {"min_interactions": 2.5}])
def test_invalid_split_config_raises_config_error(kwargs):
    with pytest.raises(ConfigError):
        SplitConfig(**kwargs)


# -- multi-domain -----------------------------------------------------------------------

# "movies" appears first, so it is domain 0. Items 1xx are books, 2xx movies.
DOMAINS = {
    "user": [1, 1, 1, 1, 2, 1, 1, 2, 2, 1],
    "item": [201, 101, 202, 102, 203, 203, 103, 201, 204, 104],
    "time": [1, 1, 2, 2, 1, 3, 3, 2, 3, 4],
    "domain": ["movies", "books", "movies", "books", "movies", "movies", "books", "movies", "movies", "books"],
}


def test_multi_domain_sequences_are_user_domain_pairs():
    sp = split_dataset(_dataset(DOMAINS))
    assert sp.domains == ["movies", "books"]
    assert sp.n_sequences == 3
    assert list(zip(sp.user_raw[sp.seq_user].tolist(), sp.seq_domain.tolist())) == [(1, 0), (1, 1), (2, 0)]
    assert sp.sequence_items(_seq_of(sp, 1, 0), (TRAIN, VALID, TEST)).tolist() == [201, 202, 203]
    assert sp.sequence_items(_seq_of(sp, 1, 1), (TRAIN, VALID, TEST)).tolist() == [101, 102, 103, 104]
    assert sp.sequence_items(_seq_of(sp, 2, 0), (TRAIN, VALID, TEST)).tolist() == [203, 201, 204]
    # each (user, domain) sequence is split on its own
    assert _parts(sp, _seq_of(sp, 1, 1)) == [TRAIN, TRAIN, VALID, TEST]
    assert _parts(sp, _seq_of(sp, 1, 0)) == [TRAIN, VALID, TEST]


def test_item_domain_maps_each_item_to_its_domain_and_padding_to_minus_one():
    sp = split_dataset(_dataset(DOMAINS))
    assert sp.item_domain[0] == -1
    expected = {101: 1, 102: 1, 103: 1, 104: 1, 201: 0, 202: 0, 203: 0, 204: 0}
    got = {int(sp.item_raw[i]): int(sp.item_domain[i]) for i in range(1, sp.n_items + 1)}
    assert got == expected


# -- side tables ---------------------------------------------------------------------


def test_features_and_groups_are_aligned_by_id_even_when_shuffled():
    # users 3, 7, 10 in the split; the tables list them shuffled, plus an unknown user 99
    user_features = pd.DataFrame(
        {"segment": [4, 1, 9, 2], "age": [5, 6, 3, 1]}, index=pd.Index([10, 99, 3, 7], name="user")
    )
    items = sorted(set(TIES["item"]))
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(items)
    item_features = pd.DataFrame(
        {"category": [i // 100 + 1 for i in shuffled], "brand": [i % 100 // 10 + 1 for i in shuffled]},
        index=pd.Index(shuffled, name="item"),
    )
    user_groups = pd.Series([2, 3, 1], index=pd.Index([7, 10, 3], name="user"))
    sp = split_dataset(
        _dataset(TIES, user_features=user_features, item_features=item_features, user_groups=user_groups)
    )
    assert sp.user_feature_names == ["segment", "age"]
    assert sp.item_feature_names == ["category", "brand"]
    assert sp.user_features.shape == (4, 2)
    assert sp.user_features[0].tolist() == [0, 0]
    for idx in range(1, sp.n_users + 1):
        assert sp.user_features[idx].tolist() == user_features.loc[sp.user_raw[idx]].tolist()
    assert sp.user_features.tolist() == [[0, 0], [9, 3], [2, 1], [4, 5]]  # padding, 3, 7, 10
    assert sp.item_features.shape == (sp.n_items + 1, 2)
    assert sp.item_features[0].tolist() == [0, 0]
    for idx in range(1, sp.n_items + 1):
        raw = int(sp.item_raw[idx])
        assert sp.item_features[idx].tolist() == [raw // 100 + 1, raw % 100 // 10 + 1]
    assert sp.user_group.tolist() == [0, 1, 2, 3]


def test_user_without_a_feature_row_gets_code_zero():
    user_features = pd.DataFrame({"segment": [4, 2]}, index=pd.Index([10, 3], name="user"))
    sp = split_dataset(_dataset(TIES, user_features=user_features))
    assert sp.user_features[:, 0].tolist() == [0, 2, 0, 4]  # padding, 3, 7 (missing), 10


def test_no_side_tables_give_none():
    sp = split_dataset(_dataset(TIES))
    assert sp.user_features is None and sp.item_features is None and sp.user_group is None
    assert sp.user_feature_names == [] and sp.item_feature_names == []


# -- time-ordered ratio split ---------------------------------------------------------

# user 1: 10 interactions at times 10..1 (file order reversed); user 2: 3 at times 5, 5, 4 (a
# tie: file order 20 then 21); user 3: 2 interactions (dropped by min_interactions 3)
RATIO = {
    "user": [1] * 10 + [2, 2, 2, 3, 3],
    "item": list(range(110, 100, -1)) + [20, 21, 22, 30, 31],
    "time": list(range(10, 0, -1)) + [5, 5, 4, 1, 2],
}


def _raw_parts(sp, raw_user):
    s = _seq_of(sp, raw_user)
    rows = slice(sp.indptr[s], sp.indptr[s + 1])
    items = sp.item_raw[sp.item[rows]].tolist()
    parts = sp.part[rows].tolist()
    return [[i for i, p in zip(items, parts) if p == want] for want in (TRAIN, VALID, TEST)]


def test_ratio_split_per_user_by_time():
    sp = split_dataset(_dataset(RATIO), SplitConfig(method="ratio"))
    assert sp.method == "ratio" and sp.n_users == 2
    # 10 interactions: 8 / 1 / 1 in time order (item 101 is the earliest)
    assert _raw_parts(sp, 1) == [[101, 102, 103, 104, 105, 106, 107, 108], [109], [110]]
    # 3 interactions: RecBole's rounding gives 1 / 1 / 1; the tie at time 5 keeps file order
    assert _raw_parts(sp, 2) == [[22], [20], [21]]


def test_ratio_split_rounding_is_recboles():
    from fedrec.data.split import ratio_counts

    n = np.array([1, 2, 3, 4, 10, 15, 25, 100])
    expected = [[1, 0, 0], [1, 0, 1], [1, 1, 1], [2, 1, 1], [8, 1, 1], [13, 1, 1], [21, 2, 2], [80, 10, 10]]
    np.testing.assert_array_equal(ratio_counts(n, (0.8, 0.1, 0.1)), expected)
    np.testing.assert_array_equal(ratio_counts(np.array([10, 3]), (0.6, 0.2, 0.2)), [[6, 2, 2], [1, 1, 1]])


def test_ratio_split_global_cut():
    cfg = SplitConfig(method="ratio", ratios=[0.6, 0.2, 0.2], order="global", min_interactions=1)
    sp = split_dataset(_dataset(RATIO), cfg)
    # 15 rows by time, ties in file order: 101 30 102 31 103 104 22 105 20 | 21 106 107 | 108 109 110
    assert sp.part_counts() == {"train": 9, "valid": 3, "test": 3}
    assert _raw_parts(sp, 1) == [[101, 102, 103, 104, 105], [106, 107], [108, 109, 110]]
    assert _raw_parts(sp, 2) == [[22, 20], [21], []] and _raw_parts(sp, 3) == [[30, 31], [], []]


def test_ratio_split_from_a_config_table_and_bad_ratios_are_one_line():
    from fedrec.config import build_config

    cfg = build_config(SplitConfig, {"method": "ratio", "ratios": [0.7, 0.2, 0.1], "order": "user"}, where="split")
    assert cfg.ratios == (0.7, 0.2, 0.1) and cfg.order == "user"
    assert SplitConfig(method="ratio").ratios == (0.8, 0.1, 0.1)
    for ratios, needle in (([0.8, 0.1], "three numbers"), ([0.8, 0.3, 0.1], "sum to 1"),
                           ([0.9, 0.1, 0.0], "must be a number > 0"), ([1.2, -0.1, -0.1], "> 0"),
                           (["a", 0.1, 0.1], "'a' is not a number")):
        with pytest.raises(ConfigError, match=needle) as info:
            SplitConfig(method="ratio", ratios=ratios)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="user or global"):
        SplitConfig(method="ratio", order="random")
    with pytest.raises(ConfigError, match="applies only to method 'ratio'"):
        SplitConfig(ratios=[0.8, 0.1, 0.1])
    with pytest.raises(ConfigError, match="applies only to method 'ratio'"):
        SplitConfig(method="leave-last-two-out", order="global")
