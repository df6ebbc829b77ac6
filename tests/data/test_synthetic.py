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
from fedrec.data.sources.synthetic import in_moments
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


# --------------------------------------------------------------------------- live-stream moments

#: digests of data generated before ``moments`` existed: the option, absent, changes nothing
BEFORE_MOMENTS = {
    "synthetic:users=50,items=40,seed=5": "8d6f70224f2fee3a",
    "synthetic:users=50,items=40,seed=5,domains=2,overlap=0.5,domain_ratio=3,behaviours=2": "97fc892a0e50c509",
}


def _digest(ds) -> str:
    import hashlib

    parts = [ds.interactions.frame, ds.item_features, ds.user_features, ds.user_groups.to_frame()]
    return hashlib.sha256(b"".join(pd.util.hash_pandas_object(p, index=True).to_numpy().tobytes()
                                   for p in parts)).hexdigest()[:16]


@pytest.mark.parametrize("spec", sorted(BEFORE_MOMENTS))
def test_data_without_moments_is_what_it_was(spec):
    ds = load_dataset(spec)
    assert _digest(ds) == BEFORE_MOMENTS[spec]
    assert "moment_windows" not in ds.meta and "moments" not in ds.meta["params"]


def _in_moment(ds) -> np.ndarray:
    """Whether each interaction row falls in one of its item's moments (from the recorded windows)."""
    frame, windows = ds.interactions.frame, ds.meta["moment_windows"]
    rows = frame.reset_index(drop=True).reset_index().merge(windows, on="item")
    hit = rows[(rows["time"] >= rows["start"]) & (rows["time"] < rows["end"])]["index"].unique()
    inside = np.zeros(len(frame), dtype=bool)
    inside[hit] = True
    return inside


@pytest.fixture(scope="module")
def with_moments():
    return load_dataset("synthetic:users=300,seed=3,moments=3,moment_length=3600")


def test_moments_raise_the_click_rate_inside_them_and_change_only_clicks(small, with_moments):
    frame, base = with_moments.interactions.frame, small.interactions.frame
    # the same exposures at the same times; the lift only adds clicks
    pd.testing.assert_frame_equal(frame[["user", "item", "time"]], base[["user", "item", "time"]])
    assert (frame["label"] >= base["label"]).all() and frame["label"].sum() > base["label"].sum()
    windows = with_moments.meta["moment_windows"]
    assert len(windows) == 3 * 1000 and (windows["end"] - windows["start"] == 3600).all()
    assert windows["start"].between(base["time"].min(), base["time"].max()).all()
    inside = in_moments(with_moments)
    assert (inside == _in_moment(with_moments)).all()
    assert 0.05 < inside.mean() < 0.5, inside.mean()
    labels = frame["label"].to_numpy()
    assert labels[inside].mean() > labels[~inside].mean() + 0.1, (labels[inside].mean(), labels[~inside].mean())
    # the added clicks are all in moments; outside them the data is the stationary one
    changed = labels != base["label"].to_numpy()
    assert changed.any() and not changed[~inside].any()
    assert with_moments.meta["params"]["moments"] == 3 and with_moments.meta["params"]["moment_lift"] == 2.0


def test_moments_are_seeded_and_the_lift_sets_their_strength(with_moments):
    again = load_dataset("synthetic:users=300,seed=3,moments=3,moment_length=3600")
    pd.testing.assert_frame_equal(with_moments.interactions.frame, again.interactions.frame)
    pd.testing.assert_frame_equal(with_moments.meta["moment_windows"], again.meta["moment_windows"])
    stronger = load_dataset("synthetic:users=300,seed=3,moments=3,moment_length=3600,moment_lift=4")
    pd.testing.assert_frame_equal(stronger.meta["moment_windows"], with_moments.meta["moment_windows"])
    assert stronger.interactions.frame["label"].sum() > with_moments.interactions.frame["label"].sum()


def test_moments_on_two_domains_cover_each_domains_items():
    ds = load_dataset("synthetic:users=100,items=30,seed=3,domains=2,moments=2")
    windows, frame = ds.meta["moment_windows"], ds.interactions.frame
    assert sorted(windows["item"].unique()) == list(range(1, 61)) and len(windows) == 120
    assert in_moments(ds)[frame["domain"].to_numpy() == "d1"].any()
    with pytest.raises(SpecError, match="has no moments"):
        in_moments(load_dataset("synthetic:users=30"))


@pytest.mark.parametrize("options, message", [
    ("moments=-1", r"option 'moments' must be >= 0 \(got -1\)"),
    ("moments=two", r"option 'moments' must be an integer \(got 'two'\)"),
    ("moment_lift=2", r"option 'moment_lift' needs moments >= 1"),
    ("moment_length=600", r"option 'moment_length' needs moments >= 1"),
    ("moments=2,moment_lift=0", r"option 'moment_lift' must be a positive finite number \(got 0\)"),
    ("moments=2,moment_lift=inf", r"option 'moment_lift' must be a positive finite number \(got inf\)"),
    ("moments=2,moment_length=-60", r"option 'moment_length' must be a positive finite number \(got -60\)"),
    ("moments=2,moment_length=nan", r"option 'moment_length' must be a number \(got 'nan'\)"),
])
def test_bad_moment_options_are_one_line(options, message):
    with pytest.raises(SpecError, match=message):
        load_dataset(f"synthetic:users=30,{options}")
