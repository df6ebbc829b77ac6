"""Tests for fedrec.data.samplers.UniformNegativeSampler: negatives are never seen items,
are uniform over the unseen ones, are reproducible through state_dict, stay in the user's
domain on multi-domain data, and a user with nothing unseen is an error.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedrec.data import Dataset, Interactions
from fedrec.data.batching import build_examples, evaluation_population
from fedrec.data.samplers import UniformNegativeSampler
from fedrec.data.split import TEST, TRAIN, VALID, split_dataset
from fedrec.errors import ConfigError, DataError


def _split(rows: list[tuple]):
    frame = pd.DataFrame(rows, columns=["user", "item", "time", "domain"][: len(rows[0])])
    return split_dataset(Dataset(name="t", interactions=Interactions.from_frame(frame, source="t")))


def _user(sp, raw: int) -> int:
    return int(np.flatnonzero(sp.user_raw == raw)[0])


def _dense_split(seen_by_user_1: int):
    """20 items; user 1 saw items 1..``seen_by_user_1``; user 2 saw 1, 2, 3 and the rest."""
    rows = [(1, i, i) for i in range(1, seen_by_user_1 + 1)]
    rows += [(2, i, i) for i in [1, 2, 3] + list(range(seen_by_user_1 + 1, 21))]
    sp = _split(rows)
    assert sp.n_items == 20 and np.array_equal(sp.item_raw[1:], np.arange(1, 21))
    return sp


def test_dense_user_only_gets_the_two_unseen_items():
    sp = _dense_split(18)
    sampler = UniformNegativeSampler(sp, seed=0)
    draws = sampler.sample(np.full(50, _user(sp, 1)), 10)
    assert draws.shape == (50, 10) and draws.dtype == np.int64
    assert set(sp.item_raw[draws].ravel().tolist()) == {19, 20}


def test_dense_user_many_draws_never_raise():
    sp = _dense_split(18)
    for seed in range(4):
        draws = UniformNegativeSampler(sp, seed=seed).sample(np.array([_user(sp, 1)]), 20_000)
        assert set(sp.item_raw[draws].ravel().tolist()) == {19, 20}


def test_draws_are_roughly_uniform_over_unseen_items():
    sp = _dense_split(10)  # user 1 has 10 unseen items: 11..20
    sampler = UniformNegativeSampler(sp, seed=3)
    draws = sp.item_raw[sampler.sample(np.array([_user(sp, 1)]), 20_000)].ravel()
    counts = pd.Series(draws).value_counts().reindex(range(11, 21), fill_value=0)
    assert counts.sum() == 20_000  # nothing outside 11..20
    expected = 20_000 / 10
    chi2 = float((((counts - expected) ** 2) / expected).sum())
    assert chi2 < 40.0, counts.to_dict()  # 9 dof: P(chi2 > 40) ~ 1e-5


def test_exclude_parts_limits_what_counts_as_seen():
    # user 1: train 1..8, valid 9, test 10; items 11, 12 from user 2
    rows = [(1, i, i) for i in range(1, 11)] + [(2, 11, 1), (2, 12, 2), (2, 1, 3)]
    sp = _split(rows)
    sampler = UniformNegativeSampler(sp, seed=0, exclude_parts=(TRAIN,))
    drawn = set(sp.item_raw[sampler.sample(np.full(200, _user(sp, 1)), 5)].ravel().tolist())
    assert drawn == {9, 10, 11, 12}


def test_state_dict_round_trip_reproduces_draws():
    sp = _dense_split(10)
    users = np.array([_user(sp, 1), _user(sp, 2)] * 5)
    sampler = UniformNegativeSampler(sp, seed=7)
    sampler.sample(users, 4)  # advance the generator
    state = sampler.state_dict()
    first = sampler.sample(users, 4)
    sampler.sample(users, 4)
    sampler.load_state_dict(state)
    assert np.array_equal(sampler.sample(users, 4), first)
    # a fresh sampler built with another seed resumes from the same state too
    other = UniformNegativeSampler(sp, seed=99)
    other.load_state_dict(state)
    assert other.seed == 7
    sampler.load_state_dict(state)
    assert np.array_equal(other.sample(users, 4), sampler.sample(users, 4))


def test_same_seed_same_draws_and_different_seed_different_draws():
    sp = _dense_split(10)
    users = np.full(100, _user(sp, 1))
    a = UniformNegativeSampler(sp, seed=1).sample(users, 3)
    b = UniformNegativeSampler(sp, seed=1).sample(users, 3)
    c = UniformNegativeSampler(sp, seed=2).sample(users, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_user_who_saw_every_item_raises_data_error():
    sp = _dense_split(20)
    sampler = UniformNegativeSampler(sp, seed=0)
    with pytest.raises(DataError, match="user 1"):
        sampler.sample(np.array([_user(sp, 2), _user(sp, 1)]), 2)


def test_zero_negatives_and_negative_count():
    sp = _dense_split(10)
    sampler = UniformNegativeSampler(sp, seed=0)
    assert sampler.sample(np.array([1, 2]), 0).shape == (2, 0)
    with pytest.raises(ConfigError):
        sampler.sample(np.array([1]), -1)


def test_multi_domain_draws_stay_in_the_given_domain():
    rows = [(1, i, i, "A") for i in range(1, 5)] + [(1, 100 + i, i, "B") for i in range(1, 4)]
    rows += [(2, i, i, "A") for i in range(5, 9)] + [(2, 100 + i, i, "B") for i in range(4, 10)]
    sp = _split(rows)
    sampler = UniformNegativeSampler(sp, seed=0)
    u1 = _user(sp, 1)
    doms = np.array([0, 1] * 50)
    draws = sampler.sample(np.full(100, u1), 6, domains=doms)
    raw = sp.item_raw[draws]
    assert set(raw[doms == 0].ravel().tolist()) == {5, 6, 7, 8}
    assert set(raw[doms == 1].ravel().tolist()) == {104, 105, 106, 107, 108, 109}
    with pytest.raises(ConfigError, match="domain"):
        sampler.sample(np.array([u1]), 2)


# ---- FixedNegatives: a paper's published negatives, read from a file ----------------------

from fedrec.data.samplers import FixedNegatives  # noqa: E402


def _fixed_split():
    """Items 1..12 (raw ids); user 1 saw 1..5, user 2 saw 6..10, user 3 saw 11, 12, 1, 2, 6."""
    rows = [(1, i, i) for i in (1, 2, 3, 4, 5)] + [(2, i, i) for i in (6, 7, 8, 9, 10)]
    rows += [(3, i, t) for t, i in enumerate((11, 12, 1, 2, 6))]
    return _split(rows)


def test_fixed_negatives_map_raw_ids_and_keep_file_order(tmp_path):
    sp = _fixed_split()
    path = tmp_path / "neg.txt"
    path.write_text("2 1 12 3\n1 11 9 6\n")
    fixed = FixedNegatives(path, sp)
    got = fixed.sample(np.array([_user(sp, 1), _user(sp, 2), _user(sp, 1)]), 3)
    raw = sp.item_raw[got]
    assert raw.tolist() == [[11, 9, 6], [1, 12, 3], [11, 9, 6]]


@pytest.mark.parametrize("text,needle", [
    ("1 11 9\n2 1 12 3\n", "line 2.*3 negatives, the first line has 2"),
    ("1 11 9 6\n7 1 12 3\n", "line 2.*unknown user id.*7"),
    ("1 11 9 99\n", "line 1.*unknown item id.*99"),
    ("1 11 9 5\n", "line 1.*interacted with.*5"),
    ("1 11 11 9\n", "line 1.*repeated negative"),
    ("1 11 9 6\n1 11 9 6\n", "line 2.*second line for this user"),
    ("1\n", "line 1.*no negatives"),
    ("\n\n", "no negatives in this file"),
])
def test_fixed_negatives_bad_files_name_the_line(tmp_path, text, needle):
    path = tmp_path / "neg.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=needle):
        FixedNegatives(path, _fixed_split())


def test_fixed_negatives_wrong_count_or_missing_user(tmp_path):
    sp = _fixed_split()
    path = tmp_path / "neg.txt"
    path.write_text("1 11 9 6\n")
    fixed = FixedNegatives(path, sp)
    with pytest.raises(ConfigError, match="holds 3 negatives per user, the protocol needs 99"):
        fixed.sample(np.array([_user(sp, 1)]), 99)
    with pytest.raises(DataError, match="no negatives for user 2"):
        fixed.sample(np.array([_user(sp, 1), _user(sp, 2)]), 3)
    with pytest.raises(DataError, match="file not found"):
        FixedNegatives(tmp_path / "absent.txt", sp)


# ---- training negatives and distinct sampled-ranking candidates ---------------------------


def test_training_sampler_may_draw_held_out_items_but_never_training_ones():
    # user 1: train 1..8, valid 9, test 10; items 11, 12 only from user 2
    rows = [(1, i, i) for i in range(1, 11)] + [(2, 11, 1), (2, 12, 2), (2, 1, 3)]
    sp = _split(rows)
    u1 = _user(sp, 1)
    assert sp.item_raw[sp.item[(sp.row_user == u1) & (sp.part == VALID)]].tolist() == [9]
    drawn = set(sp.item_raw[UniformNegativeSampler.for_training(sp, seed=0).sample(np.full(200, u1), 5)].ravel().tolist())
    assert drawn == {9, 10, 11, 12}  # the held-out 9 and 10 included, training items 1..8 never
    evaluation = set(sp.item_raw[UniformNegativeSampler(sp, seed=0).sample(np.full(200, u1), 5)].ravel().tolist())
    assert evaluation == {11, 12}


def test_distinct_rows_are_uniform_subsets_of_the_unseen_items():
    sp = _dense_split(10)  # user 1 has 10 unseen items: 11..20
    rows = 12_000
    draws = UniformNegativeSampler(sp, seed=5).sample(np.full(rows, _user(sp, 1)), 3, distinct=True)
    raw = np.sort(sp.item_raw[draws], axis=1)
    assert (raw[:, 1:] != raw[:, :-1]).all() and raw.min() >= 11 and raw.max() <= 20
    counts = pd.Series([tuple(r) for r in raw.tolist()]).value_counts()
    assert len(counts) == 120  # every 3-subset of 10 items occurs
    expected = rows / 120
    chi2 = float((((counts - expected) ** 2) / expected).sum())
    assert chi2 < 200.0, chi2  # 119 dof: mean 119, sd 15.4


def test_distinct_exact_fallback_and_too_few_unseen_items():
    sp = _dense_split(15)  # user 1 has exactly 5 unseen items: 16..20
    u1 = _user(sp, 1)
    draws = UniformNegativeSampler(sp, seed=0).sample(np.full(300, u1), 5, distinct=True)
    assert (np.sort(sp.item_raw[draws], axis=1) == np.arange(16, 21)).all()
    with pytest.raises(DataError, match="user 1 has 5 items never interacted with, fewer than the 6"):
        UniformNegativeSampler(sp, seed=0).sample(np.array([_user(sp, 2), u1]), 6, distinct=True)


def test_distinct_multi_domain_rows_stay_in_their_domain():
    rows = [(1, i, i, "A") for i in range(1, 5)] + [(1, 100 + i, i, "B") for i in range(1, 4)]
    rows += [(2, i, i, "A") for i in range(5, 9)] + [(2, 100 + i, i, "B") for i in range(4, 10)]
    sp = _split(rows)
    doms = np.array([0, 1] * 20)
    raw = sp.item_raw[UniformNegativeSampler(sp, seed=1).sample(np.full(40, _user(sp, 1)), 4, domains=doms,
                                                               distinct=True)]
    assert all(set(r) <= {5, 6, 7, 8} and len(set(r)) == 4 for r in raw[doms == 0].tolist())
    assert all(set(r) <= set(range(104, 110)) and len(set(r)) == 4 for r in raw[doms == 1].tolist())


def test_ml100k_sampled_99_candidates_are_distinct_unseen_and_fixed_by_the_seed(shared_data):
    from fedrec.data import load_dataset

    sp = split_dataset(load_dataset(f"movielens:{shared_data}/ml-100k/u.data"))
    seen = sp.seen_pairs((TRAIN, VALID, TEST))
    for stage in ("valid", "test"):
        ex = build_examples(sp, task="next_item", stage=stage, max_len=50)
        cands = ex.candidates(99, seed=2024)
        assert cands.shape == (len(ex), 100)
        ordered = np.sort(cands, axis=1)
        assert (ordered[:, 1:] != ordered[:, :-1]).all()  # 100 distinct items per row
        assert np.array_equal(cands[:, 0], sp.item[ex.target_rows[:, -1]])
        assert not np.isin(ex.users[:, None] * (sp.n_items + 1) + cands[:, 1:], seen).any()
        assert np.array_equal(ex.candidates(99, seed=2024), cands)
        assert not np.array_equal(ex.candidates(99, seed=2025), cands)
    # drawn with replacement (as before issue 14), most rows would repeat a negative
    ex = build_examples(sp, task="next_item", stage="test", max_len=50)
    old = UniformNegativeSampler(sp, seed=2024).sample(ex.users, 99)
    assert sum(np.unique(r).size < 99 for r in old) > len(ex) // 2


def test_ml100k_next_item_population_threshold_and_implicit(shared_data):
    from fedrec.data import load_dataset

    def population(spec):
        sp = split_dataset(load_dataset(spec))
        ex = {st: build_examples(sp, task="next_item", stage=st, max_len=50) for st in ("valid", "test")}
        return evaluation_population(sp, "next_item", ex)

    rated = population(f"movielens:{shared_data}/ml-100k/u.data")
    assert rated["users"] == 943 and rated["test"] == {"examples": 486, "users": 486}
    assert rated["valid"]["users"] == 493 and "positive" in rated["rule"]
    implicit = population(f"movielens:{shared_data}/ml-100k/u.data?implicit=true")
    assert implicit["test"] == {"examples": 943, "users": 943} and implicit["valid"]["users"] == 943
    assert "every interaction is a positive" in implicit["rule"]
    assert population(f"movielens:{shared_data}/ml-100k/u.data?threshold=0")["test"]["users"] == 943
