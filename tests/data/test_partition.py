"""Tests for fedrec.data.partition."""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.data.partition import (
    PARTITION_SCHEMES,
    label_distribution,
    partition_domains,
    partition_users,
)
from fedrec.errors import ConfigError


def _labels(n: int, num_labels: int = 4, seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_labels, size=n)


def _kwargs(scheme: str, n: int) -> dict:
    if scheme == "user":
        return {}
    if scheme == "iid":
        return {"num_clients": 7}
    return {"num_clients": 7, "labels": _labels(n), "alpha": 0.5}


def _assert_valid(parts: list[np.ndarray], users: np.ndarray) -> None:
    assert all(isinstance(p, np.ndarray) and p.dtype == np.int64 for p in parts)
    assert all(p.size > 0 for p in parts)
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no duplicates inside
    joined = np.concatenate(parts)
    assert joined.size == users.size  # nobody twice
    assert np.array_equal(np.sort(joined), np.sort(users))  # everybody once


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def _mean_entropy(counts: np.ndarray) -> float:
    p = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return float(h.mean())


def test_schemes_constant():
    assert PARTITION_SCHEMES == ("user", "iid", "dirichlet")


@pytest.mark.parametrize("scheme", PARTITION_SCHEMES)
def test_every_user_exactly_once(scheme):
    users = np.arange(1, 201)
    parts = partition_users(users, scheme=scheme, seed=1, **_kwargs(scheme, users.size))
    _assert_valid(parts, users)
    expected = 200 if scheme == "user" else 7
    assert len(parts) == expected


@pytest.mark.parametrize("scheme", PARTITION_SCHEMES)
def test_input_order_does_not_matter(scheme):
    users = np.arange(1, 101)
    perm = np.random.default_rng(5).permutation(users.size)
    kw = _kwargs(scheme, users.size)
    kw_perm = dict(kw)
    if "labels" in kw:
        kw_perm["labels"] = kw["labels"][perm]
    a = partition_users(users, scheme=scheme, seed=3, **kw)
    b = partition_users(users[perm], scheme=scheme, seed=3, **kw_perm)
    assert _same(a, b)


def test_user_scheme_one_per_client():
    users = np.array([5, 2, 9])
    parts = partition_users(users, scheme="user", num_clients=3)
    assert [p.tolist() for p in parts] == [[2], [5], [9]]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_determinism(scheme):
    users = np.arange(1, 501)
    kw = _kwargs(scheme, users.size)
    a = partition_users(users, scheme=scheme, seed=11, **kw)
    b = partition_users(users, scheme=scheme, seed=11, **kw)
    c = partition_users(users, scheme=scheme, seed=12, **kw)
    assert _same(a, b)
    assert not _same(a, c)
    _assert_valid(c, users)


@pytest.mark.parametrize(("n", "k"), [(100, 7), (10, 10), (1000, 3), (5, 1)])
def test_iid_balanced(n, k):
    users = np.arange(1, n + 1)
    parts = partition_users(users, scheme="iid", num_clients=k, seed=0)
    sizes = [p.size for p in parts]
    assert len(sizes) == k
    assert max(sizes) - min(sizes) <= 1
    _assert_valid(parts, users)


def test_iid_is_shuffled():
    users = np.arange(1, 101)
    parts = partition_users(users, scheme="iid", num_clients=4, seed=0)
    assert not np.array_equal(parts[0], np.arange(1, 26))


def test_dirichlet_small_alpha_more_skewed():
    users = np.arange(1, 2001)
    labels = _labels(users.size, num_labels=4, seed=7)
    lab_by_user = np.concatenate([[-1], labels])  # index = user id
    entropies = {}
    for alpha in (0.1, 100.0):
        parts = partition_users(
            users, scheme="dirichlet", num_clients=10, seed=0, alpha=alpha, labels=labels
        )
        _assert_valid(parts, users)
        counts = label_distribution(parts, lab_by_user)
        assert counts.shape == (10, 4)
        assert counts.sum() == users.size
        entropies[alpha] = _mean_entropy(counts)
    assert entropies[0.1] < entropies[100.0]
    assert entropies[100.0] > 0.95 * np.log(4)  # near-uniform label mix per client


def test_dirichlet_string_labels():
    users = np.arange(10, 310)
    labels = np.array(["a", "b", "c"])[_labels(users.size, 3)]
    parts = partition_users(users, scheme="dirichlet", num_clients=5, labels=labels, alpha=1.0)
    _assert_valid(parts, users)


def test_dirichlet_impossible_raises():
    users = np.arange(1, 21)
    with pytest.raises(ConfigError, match=r"alpha=0\.001.*larger alpha or fewer clients"):
        partition_users(
            users, scheme="dirichlet", num_clients=10, alpha=0.001, labels=np.zeros(20, int)
        )


def test_label_distribution_dict_and_array():
    parts = [np.array([1, 2]), np.array([3])]
    by_dict = {1: "x", 2: "y", 3: "y"}
    assert label_distribution(parts, by_dict).tolist() == [[1, 1], [0, 1]]
    by_array = np.array([-1, 0, 2, 2])
    assert label_distribution(parts, by_array).tolist() == [[1, 1], [0, 1]]
    with pytest.raises(ConfigError, match="4"):
        label_distribution([np.array([4])], by_dict)
    with pytest.raises(ConfigError, match="4"):
        label_distribution([np.array([4])], by_array)


# ---- errors -----------------------------------------------------------------


def test_unknown_scheme():
    with pytest.raises(ConfigError, match="'bogus'.*user, iid, dirichlet"):
        partition_users(np.arange(5), scheme="bogus", num_clients=2)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
@pytest.mark.parametrize("k", [0, -3, 11])
def test_num_clients_out_of_range(scheme, k):
    users = np.arange(1, 11)
    with pytest.raises(ConfigError, match=str(k)):
        partition_users(users, scheme=scheme, num_clients=k, labels=np.zeros(10, int))


@pytest.mark.parametrize("k", [0, 3, 11])
def test_user_scheme_wrong_num_clients(k):
    with pytest.raises(ConfigError, match=str(k)):
        partition_users(np.arange(1, 11), scheme="user", num_clients=k)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_num_clients_required(scheme):
    with pytest.raises(ConfigError, match="None"):
        partition_users(np.arange(1, 11), scheme=scheme, labels=np.zeros(10, int))


def test_num_clients_not_integer():
    with pytest.raises(ConfigError, match="2.5"):
        partition_users(np.arange(1, 11), scheme="iid", num_clients=2.5)


def test_dirichlet_labels_missing():
    with pytest.raises(ConfigError, match="labels"):
        partition_users(np.arange(1, 11), scheme="dirichlet", num_clients=2)


def test_dirichlet_labels_wrong_length():
    with pytest.raises(ConfigError, match=r"\(7,\)"):
        partition_users(np.arange(1, 11), scheme="dirichlet", num_clients=2, labels=np.zeros(7))


@pytest.mark.parametrize("alpha", [0, -0.5])
def test_dirichlet_bad_alpha(alpha):
    with pytest.raises(ConfigError, match=f"alpha.*{alpha}"):
        partition_users(
            np.arange(1, 11), scheme="dirichlet", num_clients=2, alpha=alpha, labels=np.zeros(10)
        )


def test_bad_users():
    with pytest.raises(ConfigError, match="user 3"):
        partition_users(np.array([1, 3, 3]), scheme="iid", num_clients=2)
    with pytest.raises(ConfigError, match="empty"):
        partition_users(np.array([], dtype=int), scheme="iid", num_clients=1)
    with pytest.raises(ConfigError, match="float"):
        partition_users(np.array([1.0, 2.0]), scheme="iid", num_clients=1)
    with pytest.raises(ConfigError, match=r"\(2, 2\)"):
        partition_users(np.ones((2, 2), dtype=int), scheme="iid", num_clients=1)


def test_error_messages_are_one_line():
    for call in (
        lambda: partition_users(np.arange(5), scheme="bogus"),
        lambda: partition_users(np.arange(5), scheme="iid", num_clients=9),
        lambda: partition_users(np.arange(20), scheme="dirichlet", num_clients=10,
                                alpha=0.001, labels=np.zeros(20, int)),
    ):
        with pytest.raises(ConfigError) as info:
            call()
        assert "\n" not in str(info.value)


# ---- domains ----------------------------------------------------------------


def test_domains_one_per_client():
    assert partition_domains(["books", "movies", "music"]) == [["books"], ["movies"], ["music"]]
    assert partition_domains(["books", "movies"], num_clients=2) == [["books"], ["movies"]]


def test_domains_round_robin():
    out = partition_domains(["a", "b", "c", "d", "e"], num_clients=2)
    assert out == [["a", "c", "e"], ["b", "d"]]
    assert partition_domains(["a", "b", "c"], num_clients=1) == [["a", "b", "c"]]


@pytest.mark.parametrize("k", [0, 4])
def test_domains_bad_num_clients(k):
    with pytest.raises(ConfigError, match=str(k)):
        partition_domains(["a", "b", "c"], num_clients=k)


def test_domains_bad_input():
    with pytest.raises(ConfigError, match="empty"):
        partition_domains([])
    with pytest.raises(ConfigError, match="'a'"):
        partition_domains(["a", "b", "a"])


def test_dominant_item_feature_labels_users_by_their_most_clicked_category():
    import pandas as pd

    from fedrec.data.interactions import Dataset, Interactions
    from fedrec.data.partition import dominant_item_feature
    from fedrec.data.split import split_dataset

    frame = pd.DataFrame({
        "user": [1, 1, 1, 1, 1, 2, 2, 2, 2, 2],
        "item": [10, 10, 11, 12, 12, 11, 11, 11, 10, 12],
        "time": [0, 1, 2, 3, 4, 0, 1, 2, 3, 4],
    })
    items = pd.DataFrame({"category": [1, 2, 3]}, index=pd.Index([10, 11, 12], name="item"))
    ds = Dataset("t", Interactions.from_frame(frame, source="t"), item_features=items)
    split = split_dataset(ds)
    labels = dominant_item_feature(split, "category")
    # training rows: user 1 -> items 10, 10, 11 (category 1 twice); user 2 -> 11, 11, 11 (category 2)
    assert labels.tolist() == [0, 1, 2]
    with pytest.raises(ConfigError, match="no item feature 'brand'"):
        dominant_item_feature(split, "brand")
