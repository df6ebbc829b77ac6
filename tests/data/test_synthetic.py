"""Tests for the ``synthetic:`` source: seeded reproducibility, the true user groups, the
multi-domain variant (overlap, disjoint item ranges), that the latent group structure shows
in the clicks, a plausible click rate, and option validation.

Small specs (300 users) keep every load well under a second.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedrec.data import load_dataset
from fedrec.errors import SpecError


@pytest.fixture(scope="module")
def small():
    return load_dataset("synthetic:users=300,seed=3")


@pytest.fixture(scope="module")
def two_domains():
    return load_dataset("synthetic:users=300,seed=3,domains=2,overlap=0.5")


def test_same_seed_gives_the_same_data(small):
    again = load_dataset("synthetic:users=300,seed=3")
    pd.testing.assert_frame_equal(small.interactions.frame, again.interactions.frame)
    pd.testing.assert_frame_equal(small.item_features, again.item_features)
    pd.testing.assert_frame_equal(small.user_features, again.user_features)
    pd.testing.assert_series_equal(small.user_groups, again.user_groups)


def test_different_seed_gives_different_data(small):
    other = load_dataset("synthetic:users=300,seed=4")
    assert not small.interactions.frame.equals(other.interactions.frame)


def test_canonical_columns_and_labels(small):
    frame = small.interactions.frame
    assert list(frame.columns) == ["user", "item", "time", "label"]
    assert small.interactions.has_labels and not small.interactions.has_domains
    assert frame["user"].nunique() == 300
    # every user's impressions are at increasing times, within the configured lengths
    assert frame.groupby("user")["time"].apply(lambda t: bool(np.all(np.diff(t.to_numpy()) > 0))).all()
    lengths = frame.groupby("user").size()
    assert lengths.min() >= 10 and lengths.max() <= 60


@pytest.mark.parametrize("groups", [3, 4])
def test_user_groups_one_per_user_with_the_requested_number_of_groups(groups):
    ds = load_dataset(f"synthetic:users=300,seed=3,groups={groups}")
    g = ds.user_groups
    assert g is not None and g.index.is_unique
    assert set(g.index) == set(ds.interactions.frame["user"].unique())
    assert g.nunique() == groups
    assert set(g.unique()) == set(range(1, groups + 1))  # codes start at 1


def test_multi_domain_overlap_about_half(two_domains):
    frame = two_domains.interactions.frame
    assert two_domains.interactions.domains == ["d0", "d1"]
    n_domains = frame.groupby("user")["domain"].nunique()
    both = float((n_domains == 2).mean())
    assert 0.38 <= both <= 0.62, both  # overlap=0.5, 300 users: sd ~ 0.03


def test_multi_domain_item_id_ranges_are_disjoint(two_domains):
    frame = two_domains.interactions.frame
    ranges = frame.groupby("domain")["item"].agg(["min", "max"])
    assert ranges.loc["d0", "max"] < ranges.loc["d1", "min"]
    per_item = frame.groupby("item")["domain"].nunique()
    assert (per_item == 1).all()
    # every item has a feature row, codes start at 1
    feats = two_domains.item_features
    assert set(frame["item"].unique()) <= set(feats.index)
    assert (feats.to_numpy() >= 1).all()


def test_users_of_the_same_group_click_more_alike(small):
    frame = small.interactions.frame
    category = small.item_features["category"].reindex(frame["item"])
    assert category.notna().all()
    category = category.to_numpy()
    clicks = pd.crosstab(frame["user"], category, values=frame["label"], aggfunc="sum").fillna(0.0)
    shown = pd.crosstab(frame["user"], category)
    rate = (clicks / shown).fillna(0.0).to_numpy()  # per-user, per-category click rate
    norms = np.linalg.norm(rate, axis=1, keepdims=True)
    unit = rate / np.where(norms > 0, norms, 1.0)
    cos = unit @ unit.T
    group = small.user_groups.reindex(clicks.index).to_numpy()
    same = group[:, None] == group[None, :]
    off_diagonal = ~np.eye(len(group), dtype=bool)
    within = cos[same & off_diagonal].mean()
    between = cos[~same].mean()
    assert within > between + 0.05, (within, between)


def test_label_rate_is_plausible(small):
    rate = float(small.interactions.frame["label"].mean())
    assert 0.2 < rate < 0.9, rate


def test_max_len_below_min_len_raises_spec_error():
    with pytest.raises(SpecError, match=r"max_len \(5\) must be >= min_len \(10\)"):
        load_dataset("synthetic:users=300,min_len=10,max_len=5")


@pytest.mark.parametrize(
    "spec",
    [
        "synthetic:users=300,colour=blue",
        "synthetic:users=0",
        "synthetic:users=many",
    ],
)
def test_invalid_options_raise_spec_error(spec):
    with pytest.raises(SpecError):
        load_dataset(spec)
