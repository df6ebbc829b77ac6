"""Pooled metrics from client summaries equal (LogLoss, ranking) or bound (AUC) the exact values."""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.federated.evaluation import (
    LOGIT_RANGE,
    combine_ctr,
    combine_ranking,
    ctr_summary,
    histogram_auc,
    ranking_summary,
)
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
    # logit scale: bins of [-40, 40]; logit(0.9) = 2.197 -> bin 52, logit(0.2) = -1.386 -> bin 48
    s = ctr_summary(np.array([1, 0, 1]), np.array([0.9, 0.2, 0.9]), bins=100)
    assert s["pos-bins"] == [52] and s["pos-counts"] == [2] and s["neg-bins"] == [48]
    assert s["logit-range"] == LOGIT_RANGE == 40.0
    assert set(s) == {"n", "logloss-sum", "bins", "pos-bins", "pos-counts", "neg-bins", "neg-counts", "logit-range"}
    old = ctr_summary(np.array([1, 0, 1]), np.array([0.9, 0.2, 0.9]), bins=100, scale="probability")
    assert old["pos-bins"] == [90] and old["neg-bins"] == [20] and "logit-range" not in old


def test_mixed_resolutions_and_scales_refused():
    with pytest.raises(ValueError, match="resolutions"):
        combine_ctr([ctr_summary(np.array([1, 0]), np.array([0.6, 0.4]), bins=10),
                     ctr_summary(np.array([1, 0]), np.array([0.6, 0.4]), bins=20)])
    with pytest.raises(ValueError, match="different scales: logit .*probability"):
        combine_ctr([ctr_summary(np.array([1, 0]), np.array([0.6, 0.4]), bins=10),
                     ctr_summary(np.array([1, 0]), np.array([0.6, 0.4]), bins=10, scale="probability")])


def test_bad_summary_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown histogram scale 'rank'"):
        ctr_summary(np.array([1, 0]), np.array([0.6, 0.4]), scale="rank")
    with pytest.raises(ValueError, match=r"probs must be probabilities in \[0, 1\]"):
        ctr_summary(np.array([1, 0]), np.array([0.6, np.nan]))
    with pytest.raises(ValueError, match="logits contain NaN"):
        ctr_summary(np.array([1, 0]), np.array([0.6, 0.4]), logits=np.array([0.4, np.nan]))
    with pytest.raises(ValueError, match="differ in shape"):
        ctr_summary(np.array([1, 0]), np.array([0.6, 0.4]), logits=np.array([0.4]))


def _sigmoid(z):
    return np.exp(-np.logaddexp(0.0, -z))  # float64, no overflow


def test_logit_bins_keep_a_tight_true_bound_on_saturated_scores():
    """Logits from N(0, 15): over a third of the probabilities lie within 1e-6 of 0 or 1.
    Probability bins lump them into the end bins (bound > 0.01); logit bins do not."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(11)
    n = 20_000
    labels = rng.random(n) < 0.4
    z = rng.normal(0.0, 15.0, size=n) + 4.0 * labels
    probs = _sigmoid(z)
    assert ((probs < 1e-6) | (probs > 1 - 1e-6)).mean() > 0.33
    parts = _clients(labels, np.stack([probs, z], axis=1), 5, rng)

    def pooled(**kw):
        return combine_ctr([ctr_summary(y, pz[:, 0], **kw) for y, pz in parts])

    exact = roc_auc_score(labels, probs)
    by_logit, by_prob = pooled(), pooled(scale="probability")
    assert abs(by_logit["auc"] - exact) <= by_logit["auc-error-bound"] + 1e-12
    assert by_logit["auc-error-bound"] < 1e-3
    assert abs(by_prob["auc"] - exact) <= by_prob["auc-error-bound"] + 1e-12
    assert by_prob["auc-error-bound"] > 0.01
    # the model's own logits (beyond float64's 36.7 too): exact AUC of the logits, within the bound
    own = combine_ctr([ctr_summary(y, pz[:, 0], logits=pz[:, 1]) for y, pz in parts])
    assert abs(own["auc"] - roc_auc_score(labels, z)) <= own["auc-error-bound"] + 1e-12
    assert own["auc-error-bound"] < 1e-3
    assert own["logloss"] == pytest.approx(by_logit["logloss"], rel=1e-12)  # the loss comes from probs


def test_logits_beyond_the_range_are_clipped_and_counted_in_the_bound():
    # all scores beyond +40: one end bin, so every pair may be wrong: bound 0.5, AUC 0.5
    labels = np.array([1, 0, 1, 0])
    s = ctr_summary(labels, np.ones(4), logits=np.array([50.0, 60.0, 70.0, np.inf]))
    value, bound = combine_ctr([s])["auc"], combine_ctr([s])["auc-error-bound"]
    assert s["pos-bins"] == s["neg-bins"] == [(1 << 16) - 1]
    assert value == pytest.approx(0.5) and bound == pytest.approx(0.5)


def test_ranking_sums_pool_exactly():
    rng = np.random.default_rng(0)
    ranks = rng.integers(0, 100, size=500)
    parts = np.array_split(ranks, 6)
    pooled = combine_ranking([ranking_summary(p) for p in parts])
    exact = ranking_metrics(ranks)
    for key, value in exact.items():
        assert pooled[key] == pytest.approx(value, abs=1e-12)
