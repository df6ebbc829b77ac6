"""Pooled metrics from client summaries equal (LogLoss, ranking) or bound (AUC) the exact values."""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.federated.evaluation import combine_ctr, combine_ranking, ctr_summary, histogram_auc, ranking_summary
from fedrec.metrics import auc, logloss, ranking_metrics


def _clients(labels, probs, n_clients, rng):
    owner = rng.integers(0, n_clients, size=len(labels))
    return [(labels[owner == c], probs[owner == c]) for c in range(n_clients)]


@pytest.mark.parametrize("bins", [16, 1024, 1 << 16])
@pytest.mark.parametrize("kind", ["continuous", "ties", "skewed"])
def test_histogram_auc_within_its_bound_of_exact_auc(bins, kind):
    rng = np.random.default_rng(3)
    n = 3000
    labels = rng.random(n) < 0.3
    if kind == "continuous":
        probs = 1 / (1 + np.exp(-(rng.normal(size=n) + labels)))
    elif kind == "ties":
        probs = np.round(rng.random(n) * 0.5 + 0.4 * labels, 2)
    else:
        probs = rng.beta(0.3, 8, size=n) + 0.02 * labels
    probs = np.clip(probs, 0, 1)
    summaries = [ctr_summary(y, p, bins=bins) for y, p in _clients(labels, probs, 7, rng)]
    pooled = combine_ctr(summaries)
    exact = auc(labels, probs)
    assert abs(pooled["auc"] - exact) <= pooled["auc-error-bound"] + 1e-12
    assert pooled["logloss"] == pytest.approx(logloss(labels, probs), rel=1e-9)
    assert pooled["n"] == n
    if kind == "continuous" and bins == 1 << 16:
        assert pooled["auc-error-bound"] < 1e-3


def test_histogram_auc_hand_computed():
    # bin 0: 1 neg; bin 1: 1 pos + 1 neg; bin 2: 1 pos -> pairs: (p1>n0) 1, (p1~n1) .5, (p2>n0) 1, (p2>n1) 1
    value, bound = histogram_auc(np.array([0, 1, 1]), np.array([1, 1, 0]))
    assert value == pytest.approx(3.5 / 4)
    assert bound == pytest.approx(0.5 * 1 / 4)


def test_summaries_carry_no_raw_scores():
    s = ctr_summary(np.array([1, 0, 1]), np.array([0.9, 0.2, 0.9]), bins=100)
    assert s["pos-bins"] == [90] and s["pos-counts"] == [2] and s["neg-bins"] == [20]
    assert set(s) == {"n", "logloss-sum", "bins", "pos-bins", "pos-counts", "neg-bins", "neg-counts"}


def test_mixed_resolutions_refused():
    with pytest.raises(ValueError, match="resolutions"):
        combine_ctr([ctr_summary(np.array([1, 0]), np.array([0.6, 0.4]), bins=10),
                     ctr_summary(np.array([1, 0]), np.array([0.6, 0.4]), bins=20)])


def test_ranking_sums_pool_exactly():
    rng = np.random.default_rng(0)
    ranks = rng.integers(0, 100, size=500)
    parts = np.array_split(ranks, 6)
    pooled = combine_ranking([ranking_summary(p) for p in parts])
    exact = ranking_metrics(ranks)
    for key, value in exact.items():
        assert pooled[key] == pytest.approx(value, abs=1e-12)
