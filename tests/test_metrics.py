"""Tests for fedrec.metrics: hand-computed cases, scikit-learn parity, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from fedrec.metrics import (
    auc,
    ctr_metrics,
    full_ranking_ranks,
    gauc,
    hit_rate,
    logloss,
    mrr,
    ndcg,
    rank_of_target,
    ranking_metrics,
    sampled_ranking_ranks,
)

# ---------------------------------------------------------------------------
# 1. tiny hand-computed cases
# ---------------------------------------------------------------------------


def test_auc_hand_computed():
    # positives: 0.35, 0.8; negatives: 0.1, 0.4.  Pairs (pos > neg):
    # 0.35>0.1 yes, 0.35>0.4 no, 0.8>0.1 yes, 0.8>0.4 yes -> 3/4
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75, abs=1e-12)


def test_auc_with_tie_counts_half():
    # positives: 0.5, 0.9; negatives: 0.5, 0.1.  Pairs:
    # 0.5 vs 0.5 tie -> 0.5, 0.5>0.1 -> 1, 0.9>0.5 -> 1, 0.9>0.1 -> 1 -> 3.5/4
    assert auc([1, 0, 1, 0], [0.5, 0.5, 0.9, 0.1]) == pytest.approx(0.875, abs=1e-12)


def test_auc_all_tied_is_half_and_perfect_is_one():
    assert auc([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3]) == pytest.approx(0.5)
    assert auc([0, 0, 1], [0.1, 0.2, 0.9]) == pytest.approx(1.0)
    assert auc([0, 0, 1], [0.9, 0.2, 0.1]) == pytest.approx(0.0)


def test_auc_accepts_torch_and_bool_labels():
    labels = torch.tensor([False, False, True, True])
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8], requires_grad=True)
    assert auc(labels, scores) == pytest.approx(0.75, abs=1e-7)


def test_logloss_hand_computed():
    # -(log 0.8 + log(1 - 0.4)) / 2 = -(log 0.8 + log 0.6) / 2
    expected = -(math.log(0.8) + math.log(0.6)) / 2
    assert logloss([1, 0], [0.8, 0.4]) == pytest.approx(expected, abs=1e-12)


def test_logloss_clips_probabilities():
    # p = 0 for a positive is clipped to eps: loss = -log(1e-7)
    assert logloss([1], [0.0]) == pytest.approx(-math.log(1e-7), rel=1e-9)
    assert logloss([0], [1.0], eps=1e-3) == pytest.approx(-math.log(1e-3), rel=1e-9)


def test_gauc_two_users_by_hand():
    # user "a": labels [1, 0, 0], scores [0.9, 0.5, 0.95]
    #   pairs: 0.9>0.5 yes, 0.9>0.95 no -> AUC 1/2
    # user "b": labels [1, 0, 1, 0], scores [0.7, 0.2, 0.3, 0.6]
    #   pairs: 0.7>0.2 y, 0.7>0.6 y, 0.3>0.2 y, 0.3>0.6 n -> AUC 3/4
    # user "c": only negatives -> skipped
    # gauc = (3 * 0.5 + 4 * 0.75) / (3 + 4) = 4.5 / 7
    users = ["a", "b", "a", "c", "b", "a", "b", "b", "c"]
    labels = [1, 1, 0, 0, 0, 0, 1, 0, 0]
    scores = [0.9, 0.7, 0.5, 0.4, 0.2, 0.95, 0.3, 0.6, 0.8]
    assert gauc(users, labels, scores) == pytest.approx(4.5 / 7, abs=1e-12)


def test_gauc_ties_within_user_and_nan_when_no_user_qualifies():
    # user 1: labels [1, 0], scores [0.3, 0.3] -> tie -> 0.5
    # user 2: labels [1, 0], scores [0.3, 0.1] -> 1.0 (tie with user 1's 0.3 is irrelevant)
    # gauc = (2 * 0.5 + 2 * 1.0) / 4 = 0.75
    assert gauc([1, 1, 2, 2], [1, 0, 1, 0], [0.3, 0.3, 0.3, 0.1]) == pytest.approx(0.75)
    assert math.isnan(gauc([1, 1, 2], [1, 1, 0], [0.1, 0.2, 0.3]))


def test_ctr_metrics_keys():
    out = ctr_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert set(out) == {"auc", "logloss"}
    assert out["auc"] == pytest.approx(0.75)
    out = ctr_metrics([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.3], users=[0, 0, 1, 2])
    # user 0: AUC 1, user 1/2: single class -> gauc = 1
    assert set(out) == {"auc", "logloss", "gauc"}
    assert out["gauc"] == pytest.approx(1.0)
    out = ctr_metrics([0, 1], [0.1, 0.9], users=[0, 1])
    assert math.isnan(out["gauc"])


def test_rank_of_target_strict_and_ties():
    scores = np.array(
        [
            [0.5, 0.9, 0.1, 0.7],  # 2 strictly greater -> 2
            [0.5, 0.5, 0.1, 0.9],  # 1 greater + 1 tie / 2 -> 1.5
            [0.9, 0.1, 0.2, 0.3],  # best -> 0
            [0.5, np.nan, -np.inf, 0.5],  # nan/-inf excluded, 1 tie -> 0.5
        ]
    )
    np.testing.assert_array_equal(rank_of_target(scores), [2.0, 1.5, 0.0, 0.5])
    # target in the last column: row 0 target 0.7 -> 1 greater (0.9) -> 1
    assert rank_of_target(scores[:1], target_index=3)[0] == 1.0
    assert rank_of_target(scores[:1], target_index=-1)[0] == 1.0
    assert rank_of_target(scores).dtype == np.float64


def test_sampled_ranking_ranks():
    target = np.array([0.5, 0.2, 0.9])
    negatives = np.array(
        [
            [0.6, 0.5, 0.1],  # 1 greater + 1 tie -> 1.5
            [0.3, 0.4, 0.5],  # 3 greater -> 3
            [0.1, np.nan, -np.inf],  # 0
        ]
    )
    np.testing.assert_array_equal(sampled_ranking_ranks(target, negatives), [1.5, 3.0, 0.0])
    np.testing.assert_array_equal(
        sampled_ranking_ranks(torch.tensor(target), torch.tensor(negatives)), [1.5, 3.0, 0.0]
    )


def test_hit_rate_ndcg_mrr_by_hand():
    ranks = [0, 3, 12]
    # k=10: ranks 0 and 3 hit -> 2/3
    assert hit_rate(ranks, 10) == pytest.approx(2 / 3)
    # ndcg@10 = (1/log2(2) + 1/log2(5) + 0) / 3
    assert ndcg(ranks, 10) == pytest.approx((1 + 1 / math.log2(5)) / 3, abs=1e-12)
    # mrr = (1 + 1/4 + 1/13) / 3
    assert mrr(ranks) == pytest.approx((1 + 1 / 4 + 1 / 13) / 3, abs=1e-12)
    # k=3: only rank 0 hits (3 is not < 3)
    assert hit_rate(ranks, 3) == pytest.approx(1 / 3)
    assert ndcg(ranks, 3) == pytest.approx(1 / 3)


def test_fractional_rank_uses_same_formulas():
    # rank 0.5 (a tie at the top): ndcg = 1/log2(2.5), mrr = 1/1.5
    assert ndcg([0.5], 1) == pytest.approx(1 / math.log2(2.5))
    assert mrr([0.5]) == pytest.approx(1 / 1.5)
    assert hit_rate([0.5], 1) == 1.0


def test_ranking_metrics_keys_and_values():
    ranks = np.array([0, 3, 12])
    out = ranking_metrics(ranks, ks=(5, 10))
    assert list(out) == ["hr@5", "ndcg@5", "hr@10", "ndcg@10", "mrr"]
    assert out["hr@10"] == pytest.approx(2 / 3)
    assert out["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5)) / 3)
    assert out["hr@5"] == pytest.approx(2 / 3)
    assert set(ranking_metrics(ranks)) == {
        "hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr",
    }


# Items 0..5; column 0 is padding.  One user, target item 2 (score 0.5).
FULL_SCORES = np.array([[9.0, 0.9, 0.5, 0.8, 0.1, 0.5]])


def test_full_ranking_padding_always_excluded():
    # padding (9.0) would beat the target; it is ignored.
    # greater: items 1 (0.9), 3 (0.8) -> 2; tie: item 5 -> 0.5 -> rank 2.5
    np.testing.assert_array_equal(full_ranking_ranks(FULL_SCORES, [2]), [2.5])


def test_full_ranking_exclusion_changes_rank_all_formats():
    # excluding training items 1 and 5 leaves only item 3 above -> rank 1
    csr = (np.array([0, 2]), np.array([1, 5]))
    mask = np.zeros_like(FULL_SCORES, dtype=bool)
    mask[0, [1, 5]] = True
    for exclude in (csr, mask, torch.tensor(mask), [[1, 5]]):
        np.testing.assert_array_equal(full_ranking_ranks(FULL_SCORES, [2], exclude), [1.0])


def test_full_ranking_target_in_exclude_is_kept():
    # exclude lists the target (2) and item 3: target stays, item 3 is removed.
    # greater: item 1 -> 1; tie: item 5 -> 0.5 -> 1.5
    csr = (np.array([0, 2]), np.array([2, 3]))
    np.testing.assert_array_equal(full_ranking_ranks(FULL_SCORES, [2], csr), [1.5])
    mask = np.zeros_like(FULL_SCORES, dtype=bool)
    mask[0, [2, 3]] = True
    np.testing.assert_array_equal(full_ranking_ranks(FULL_SCORES, [2], mask), [1.5])


def test_full_ranking_several_rows_csr():
    scores = np.array(
        [
            [0.0, 0.3, 0.2, 0.1],  # target 3: 2 greater; exclude {1} -> 1
            [0.0, 0.3, 0.2, 0.1],  # target 1: best -> 0; exclude {} -> 0
            [0.0, 0.3, 0.3, 0.3],  # target 2: two ties -> 1; exclude {3} -> 0.5
        ]
    )
    csr = (np.array([0, 1, 1, 2]), np.array([1, 3]))
    np.testing.assert_array_equal(full_ranking_ranks(scores, [3, 1, 2], csr), [1.0, 0.0, 0.5])
    np.testing.assert_array_equal(full_ranking_ranks(scores, [3, 1, 2]), [2.0, 0.0, 1.0])
    # the caller's array is not modified
    assert scores[0, 0] == 0.0 and scores[0, 1] == 0.3


# ---------------------------------------------------------------------------
# 2. against scikit-learn
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_auc_and_logloss_match_sklearn(decimals):
    rng = np.random.default_rng(12345)
    labels = rng.integers(0, 2, size=1000)
    probs = np.clip(rng.random(1000) * 0.6 + 0.4 * labels * rng.random(1000), 0.001, 0.999)
    if decimals is not None:  # rounding creates many ties
        probs = np.clip(np.round(probs, decimals), 0.001, 0.999)
        assert len(np.unique(probs)) < 200
    assert auc(labels, probs) == pytest.approx(roc_auc_score(labels, probs), abs=1e-9)
    assert logloss(labels, probs) == pytest.approx(log_loss(labels, probs), abs=1e-7)


def test_auc_matches_sklearn_on_torch_float32():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, size=1000)
    scores = rng.normal(size=1000).astype(np.float32).round(1)
    expected = roc_auc_score(labels, scores)
    assert auc(torch.from_numpy(labels), torch.from_numpy(scores)) == pytest.approx(
        expected, abs=1e-9
    )


# ---------------------------------------------------------------------------
# vectorised gauc against a per-user loop
# ---------------------------------------------------------------------------


def _gauc_reference(users, labels, scores):
    num, den = 0.0, 0.0
    for u in np.unique(users):
        sel = users == u
        y, s = labels[sel], scores[sel]
        if y.min() == y.max():
            continue
        num += sel.sum() * roc_auc_score(y, s)
        den += sel.sum()
    return num / den if den else float("nan")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gauc_matches_per_user_loop(seed):
    rng = np.random.default_rng(seed)
    n = 5000
    users = rng.integers(0, 200, size=n) * 7 + 3  # non-contiguous ids
    labels = (rng.random(n) < 0.3).astype(int)
    scores = np.round(rng.random(n) + 0.3 * labels, 1)  # many within-user ties
    # a few users with a single class
    labels[users == 3] = 0
    labels[users == 10] = 1
    order = rng.permutation(n)
    users, labels, scores = users[order], labels[order], scores[order]
    assert gauc(users, labels, scores) == pytest.approx(
        _gauc_reference(users, labels, scores), abs=1e-12
    )


# ---------------------------------------------------------------------------
# 3. error cases
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("labels, cls", [([1, 1, 1], "1"), ([0, 0], "0")])
def test_auc_single_class_raises(labels, cls):
    with pytest.raises(ValueError, match=rf"only one class \({cls}\)"):
        auc(labels, np.linspace(0, 1, len(labels)))


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="differ in length"):
        auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="differ in length"):
        logloss([0, 1], [0.1])
    with pytest.raises(ValueError, match="differ in length"):
        gauc([1, 2], [0, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="differ in rows"):
        sampled_ranking_ranks([0.1, 0.2], [[0.1, 0.3]])
    with pytest.raises(ValueError, match="differ in rows"):
        full_ranking_ranks(FULL_SCORES, [1, 2])


def test_bad_labels_and_scores_raise():
    with pytest.raises(ValueError, match="0 or 1"):
        auc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="non-finite"):
        auc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="non-finite"):
        auc([0, 1], [0.1, np.inf])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        logloss([0, 1], [0.1, 1.5])
    with pytest.raises(ValueError, match="empty"):
        auc([], [])


def test_ranking_errors_raise():
    with pytest.raises(ValueError, match="padding"):
        full_ranking_ranks(FULL_SCORES, [0])
    with pytest.raises(ValueError, match="indptr"):
        full_ranking_ranks(FULL_SCORES, [2], (np.array([0]), np.array([1])))
    with pytest.raises(ValueError, match="mask"):
        full_ranking_ranks(FULL_SCORES, [2], np.zeros((1, 3), dtype=bool))
    with pytest.raises(ValueError, match="target score is nan"):
        rank_of_target([[np.nan, 0.1]])
    with pytest.raises(ValueError, match="positive integer"):
        hit_rate([0, 1], 0)
    with pytest.raises(ValueError, match="non-negative"):
        ndcg([-1.0], 5)


# ---------------------------------------------------------------------------
# top-K metrics (RecBole's definitions), the K list, coverage
# ---------------------------------------------------------------------------


def test_topk_metrics_one_item_per_user_by_hand():
    # ranks 0, 3, 12 (one held-out item each), K = 5 and 10
    from fedrec.metrics import topk_metrics

    out = topk_metrics(np.array([0, 3, 12]), ks=(5, 10))
    assert list(out) == ["hr@5", "ndcg@5", "recall@5", "precision@5", "map@5",
                         "hr@10", "ndcg@10", "recall@10", "precision@10", "map@10", "mrr"]
    # hits at K=5 and K=10: ranks 0 and 3 -> 2 of 3 users
    assert out["recall@5"] == out["hr@5"] == pytest.approx(2 / 3)
    assert out["precision@5"] == pytest.approx((2 / 3) / 5)
    assert out["precision@10"] == pytest.approx((2 / 3) / 10)
    # MAP@K = reciprocal rank truncated at K: (1/1 + 1/4 + 0) / 3
    assert out["map@5"] == out["map@10"] == pytest.approx((1 + 0.25) / 3)
    assert out["mrr"] == pytest.approx((1 + 1 / 4 + 1 / 13) / 3)  # no cut-off
    # the leave-one-out keys are exactly ranking_metrics's (same formulas, same order of sums)
    old = ranking_metrics(np.array([0, 3, 12]), ks=(5, 10))
    assert {k: out[k] for k in old} == old


def test_topk_metrics_several_items_per_user_by_hand():
    # user A: relevant items at positions 0, 2, 5 (3 items); user B: one item at position 1
    from fedrec.metrics import topk_metrics

    out = topk_metrics([5, 0, 2, 1], ks=(1, 3), groups=["A", "A", "A", "B"])
    # K=1: A hits (pos 0), B does not
    assert out["hr@1"] == 0.5
    assert out["recall@1"] == pytest.approx((1 / 3 + 0) / 2)
    assert out["precision@1"] == pytest.approx((1 + 0) / 2)
    assert out["ndcg@1"] == pytest.approx((1 + 0) / 2)  # ideal DCG of min(3, 1) = 1 item
    assert out["map@1"] == pytest.approx((1 / 1 + 0) / 2)
    # K=3: A hits positions 0 and 2, B position 1
    assert out["hr@3"] == 1.0
    assert out["recall@3"] == pytest.approx((2 / 3 + 1) / 2)
    assert out["precision@3"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    dcg_a = 1 / math.log2(2) + 1 / math.log2(4)
    idcg_a = 1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)  # min(3, 3) items at the top
    assert out["ndcg@3"] == pytest.approx((dcg_a / idcg_a + (1 / math.log2(3)) / 1) / 2)
    # MAP@3: A (P@1 = 1 at the first hit, P@3 = 2/3 at the second) / min(3, 3); B P@2 = 1/2 / 1
    assert out["map@3"] == pytest.approx(((1 + 2 / 3) / 3 + 0.5) / 2)
    assert out["mrr"] == pytest.approx((1 + 1 / 2) / 2)  # the first relevant item of each user


def test_topk_metrics_ideal_dcg_caps_at_k():
    # 4 relevant items at positions 0..3 of a user, K = 2: NDCG 1, MAP 1, recall 2/4, precision 1
    from fedrec.metrics import topk_metrics

    out = topk_metrics([0, 1, 2, 3], ks=(2,), groups=[7, 7, 7, 7])
    assert out["ndcg@2"] == pytest.approx(1.0) and out["map@2"] == pytest.approx(1.0)
    assert out["recall@2"] == pytest.approx(0.5) and out["precision@2"] == pytest.approx(1.0)


def test_top_k_items_and_coverage_by_hand():
    from fedrec.metrics import item_coverage, top_k_items, topk_metrics

    # items 1..5 (column 0 padding scores highest but is never listed); row 1 ties 0.5 twice
    scores = np.array([[9.0, 0.9, 0.5, 0.8, 0.1, 0.5],
                       [9.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    np.testing.assert_array_equal(top_k_items(scores, 3), [[1, 3, 2], [5, 4, 3]])  # tie 2 vs 5: lower id
    # excluded items (a user's history) never appear; too few candidates leave -1
    np.testing.assert_array_equal(top_k_items(scores, 3, exclude=[[1, 3], [5]]), [[2, 5, 4], [4, 3, 2]])
    np.testing.assert_array_equal(top_k_items(scores[:, :3], 3, exclude=[[1], []]), [[2, -1, -1], [2, 1, -1]])
    top = top_k_items(scores, 3)
    # top-1 lists {1}, {5}: 2 of 5 items; top-3: {1, 2, 3, 4, 5}: all
    assert item_coverage(top, 5, ks=(1, 3)) == {"coverage@1": pytest.approx(2 / 5), "coverage@3": 1.0}
    out = topk_metrics([0, 1], ks=(1, 3), top_items=top, n_items=5)
    assert out["coverage@1"] == pytest.approx(0.4) and list(out)[5] == "coverage@1"
    with pytest.raises(ValueError, match="coverage@4 needs 4"):
        item_coverage(top, 5, ks=(4,))


@pytest.mark.parametrize("value,expected", [("5,10,20,50", (5, 10, 20, 50)), ([10, 5, 10], (10, 5)), (7, (7,))])
def test_parse_topk(value, expected):
    from fedrec.metrics import parse_topk

    assert parse_topk(value) == expected


@pytest.mark.parametrize("value,needle", [("", "comma-separated"), ("5,,10", "comma-separated"), ("0", "got 0"),
                                          ("-3", "got -3"), ("5,x", "got 'x'"), ([], "empty"), ([2.5], "got 2.5"),
                                          (True, "expected a list")])
def test_parse_topk_refuses_bad_k(value, needle):
    from fedrec.metrics import parse_topk

    with pytest.raises(ValueError, match=needle):
        parse_topk(value)
