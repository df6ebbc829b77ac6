"""Evaluation metrics for federated recommendation experiments.

Two evaluation protocols are supported. Every function accepts numpy arrays,
anything :func:`numpy.asarray` understands, or torch tensors (converted with
``.detach().cpu().numpy()``; torch is never imported here). All computations
are vectorised numpy; none loops over users or rows in Python.

CTR protocol (point-wise prediction)
------------------------------------
Each impression has a binary label (1 = click) and a predicted score or
probability.

* :func:`auc` -- ROC AUC, computed from average ranks (Mann-Whitney U), so a
  positive and a negative with equal scores count as half a correctly ordered
  pair.
* :func:`logloss` -- mean binary cross-entropy, probabilities clipped to
  ``[eps, 1 - eps]``.
* :func:`gauc` -- group AUC: the AUC of each user, weighted by that user's
  number of impressions, over the users that have both a positive and a
  negative impression. Users with a single class carry no ranking information
  and are skipped; if no user qualifies the result is ``nan``.
* :func:`ctr_metrics` bundles the three.

Top-K ranking protocol (leave-one-out)
--------------------------------------
Each evaluation row holds one held-out target item that must be ranked among
candidates. Ranks are **0-based** (rank 0 = the target scored highest) and
ties are resolved by expectation::

    rank = #{candidates scoring strictly higher than the target}
           + 0.5 * #{other candidates scoring exactly as the target}

which is the expected rank under uniformly random tie-breaking, so a model
that scores everything equally is not rewarded. Candidates scored ``nan`` or
``-inf`` are *excluded*: they are never counted as higher or as tied.

* :func:`full_ranking_ranks` -- the target against every item. Column 0 of
  the score matrix is the padding item and is always excluded; the user's
  training items may be excluded too, but the target itself never is.
* :func:`sampled_ranking_ranks` -- the target against ``N`` sampled
  negatives.
* :func:`rank_of_target` -- the target in a given column of a candidate
  matrix.

From ranks, :func:`hit_rate` (HR@K), :func:`ndcg` (NDCG@K for a single
relevant item: ``1 / log2(rank + 2)`` if ``rank < k`` else 0) and :func:`mrr`
(mean of ``1 / (rank + 1)``) are computed; :func:`ranking_metrics` returns
them all. Fractional ranks produced by ties go through the same formulas.

Top-K metrics (RecBole's definitions)
-------------------------------------
:func:`topk_metrics` adds Recall@K, Precision@K, MAP@K and item coverage@K to
HR@K, NDCG@K and MRR, and handles **several relevant items per user** (a
time-ordered ratio split holds out a user's last 10 %, not one item). Each row
is then one (user, relevant item) pair: its rank among all the user's
candidates, the user's other relevant items included, i.e. its 0-based
position in the user's ranked list. Per user, with ``m`` relevant items at
positions ``r_1 <= r_2 <= ...`` and ``hits@K = #{j: r_j < K}``:

* HR@K = 1 if ``hits@K > 0``;
* Recall@K = ``hits@K / m``; Precision@K = ``hits@K / K``;
* NDCG@K = ``sum_{r_j < K} 1 / log2(r_j + 2)`` over the ideal DCG of
  ``min(m, K)`` relevant items at the top;
* MAP@K = ``sum_{r_j < K} (j / (r_j + 1)) / min(m, K)`` (the precision at each
  hit's position, averaged over ``min(m, K)``);
* MRR = ``1 / (r_1 + 1)`` (the first relevant item; no cut-off).

Each is averaged over users (RecBole's ``recall``, ``precision``, ``map``,
``hit``, ``ndcg``, ``mrr``; its MRR is truncated at K, ours is not). With one
relevant item per user they reduce to the leave-one-out formulas: Recall@K =
HR@K, Precision@K = HR@K / K, MAP@K = the reciprocal rank truncated at K.
Item coverage@K (:func:`item_coverage`, RecBole's ``itemcoverage``) is the
share of the catalogue's items that appear in at least one evaluated top-K
list (:func:`top_k_items`); it needs the lists, hence full ranking.
:func:`parse_topk` reads a K list (``[5, 10, 20]`` or ``"5,10,20"``).

Invalid input raises :class:`ValueError` with a one-line message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "auc",
    "logloss",
    "gauc",
    "ctr_metrics",
    "rank_of_target",
    "full_ranking_ranks",
    "sampled_ranking_ranks",
    "hit_rate",
    "ndcg",
    "mrr",
    "ranking_metrics",
    "topk_metrics",
    "top_k_items",
    "item_coverage",
    "parse_topk",
    "DEFAULT_TOPK",
]

#: the K list of HR / NDCG / Recall / Precision / MAP / coverage @K unless one is given
DEFAULT_TOPK = (5, 10, 20)

ArrayLike = Any  # numpy array, torch tensor, or a nested sequence of numbers


# ---------------------------------------------------------------------------
# input handling
# ---------------------------------------------------------------------------


def _to_numpy(x: ArrayLike) -> np.ndarray:
    """Return ``x`` as a numpy array; torch tensors go through ``.detach().cpu()``."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        t = x.detach().cpu()
        try:
            return t.numpy()
        except TypeError:  # dtypes numpy lacks, e.g. bfloat16
            return t.float().numpy()
    return np.asarray(x)


def _vector(x: ArrayLike, name: str) -> np.ndarray:
    arr = _to_numpy(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _check_labels(labels: ArrayLike) -> np.ndarray:
    y = _vector(labels, "labels")
    if y.size == 0:
        raise ValueError("labels are empty")
    if y.dtype.kind not in "biuf":
        raise ValueError(f"labels must be numeric 0/1, got dtype {y.dtype}")
    ok = (y == 0) | (y == 1)
    if not np.all(ok):
        bad = y[~ok][0]
        raise ValueError(f"labels must be 0 or 1, found {bad!r}")
    return y.astype(np.int64)


def _check_scores(scores: ArrayLike, n: int, name: str) -> np.ndarray:
    s = _vector(scores, name)
    if s.shape[0] != n:
        raise ValueError(f"labels and {name} differ in length: {n} vs {s.shape[0]}")
    if s.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} contain non-finite values (nan or inf)")
    return s


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` in ascending order, ties given their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of the last member of each tie group
    return (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]


# ---------------------------------------------------------------------------
# CTR metrics
# ---------------------------------------------------------------------------


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve, ties counted as one half.

    Computed as the Mann-Whitney U statistic from average ranks:
    ``(sum of positive ranks - P (P + 1) / 2) / (P N)`` for ``P`` positives and
    ``N`` negatives.

    Parameters
    ----------
    labels : array-like of shape (n,)
        Binary labels, each 0 or 1 (bool, int or float).
    scores : array-like of shape (n,)
        Finite scores; higher means more likely positive. Only their order
        matters.

    Returns
    -------
    float
        The AUC in ``[0, 1]``.

    Raises
    ------
    ValueError
        If the lengths differ, a label is not 0/1, a score is not finite, or
        the labels hold only one class (AUC is undefined then).
    """
    y = _check_labels(labels)
    s = _check_scores(scores, y.shape[0], "scores")
    n_pos = int(y.sum())
    n_neg = y.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        only = 1 if n_neg == 0 else 0
        raise ValueError(
            f"AUC is undefined: labels contain only one class ({only}); need both 0 and 1"
        )
    ranks = _average_ranks(s)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def logloss(labels: ArrayLike, probs: ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy.

    Parameters
    ----------
    labels : array-like of shape (n,)
        Binary labels, each 0 or 1.
    probs : array-like of shape (n,)
        Predicted probabilities of the positive class, each in ``[0, 1]``.
    eps : float, default 1e-7
        Probabilities are clipped to ``[eps, 1 - eps]`` before taking logs, so
        the loss stays finite.

    Returns
    -------
    float
        ``-mean(y log p + (1 - y) log(1 - p))`` in nats.

    Raises
    ------
    ValueError
        If the lengths differ, a label is not 0/1, a probability is not finite
        or lies outside ``[0, 1]``, or ``eps`` is not in ``(0, 0.5)``.
    """
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must lie in (0, 0.5), got {eps}")
    y = _check_labels(labels)
    p = _check_scores(probs, y.shape[0], "probs")
    if np.any((p < 0.0) | (p > 1.0)):
        raise ValueError("probs must lie in [0, 1]")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(np.where(y == 1, np.log(p), np.log1p(-p))))


def gauc(users: ArrayLike, labels: ArrayLike, scores: ArrayLike) -> float:
    """Group AUC: per-user AUC averaged with impression-count weights.

    ``gauc = sum_u n_u * auc_u / sum_u n_u`` over the users ``u`` that have at
    least one positive and one negative impression, where ``n_u`` is the
    user's number of impressions. Within a user, ties count as one half,
    exactly as in :func:`auc`. The computation is vectorised: rows are sorted
    by ``(user, score)`` and average ranks are computed per run of equal
    ``(user, score)``.

    Parameters
    ----------
    users : array-like of shape (n,)
        User of each impression; any values :func:`numpy.unique` can sort.
    labels : array-like of shape (n,)
        Binary labels, each 0 or 1.
    scores : array-like of shape (n,)
        Finite scores; higher means more likely positive.

    Returns
    -------
    float
        The group AUC, or ``nan`` if no user has both classes.

    Raises
    ------
    ValueError
        If the lengths differ, a label is not 0/1 or a score is not finite.
    """
    y = _check_labels(labels)
    s = _check_scores(scores, y.shape[0], "scores")
    u = _vector(users, "users")
    if u.shape[0] != y.shape[0]:
        raise ValueError(f"users and labels differ in length: {u.shape[0]} vs {y.shape[0]}")
    _, group = np.unique(u, return_inverse=True)
    group = group.reshape(-1)
    n_groups = int(group.max()) + 1

    order = np.lexsort((s, group))
    g_sorted = group[order]
    s_sorted = s[order]
    y_sorted = y[order]
    n = y.shape[0]
    idx = np.arange(n)

    # Start of each row's user block in sorted order.
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    new_group[1:] = g_sorted[1:] != g_sorted[:-1]
    group_start = np.maximum.accumulate(np.where(new_group, idx, 0))

    # Runs of equal (user, score): first and last position of each run.
    new_run = new_group.copy()
    new_run[1:] |= s_sorted[1:] != s_sorted[:-1]
    run_starts = np.flatnonzero(new_run)
    run_ends = np.append(run_starts[1:], n) - 1
    run_id = np.cumsum(new_run) - 1
    # 1-based average rank within the user's block.
    ranks = (run_starts[run_id] + run_ends[run_id]) / 2.0 - group_start + 1.0

    counts = np.bincount(g_sorted, minlength=n_groups).astype(np.float64)
    n_pos = np.bincount(g_sorted, weights=y_sorted, minlength=n_groups)
    n_neg = counts - n_pos
    pos_rank_sum = np.bincount(g_sorted, weights=ranks * y_sorted, minlength=n_groups)

    valid = (n_pos > 0) & (n_neg > 0)
    if not np.any(valid):
        return float("nan")
    per_user = (pos_rank_sum[valid] - n_pos[valid] * (n_pos[valid] + 1) / 2.0) / (
        n_pos[valid] * n_neg[valid]
    )
    weights = counts[valid]
    return float(np.sum(weights * per_user) / np.sum(weights))


def ctr_metrics(
    labels: ArrayLike, probs: ArrayLike, users: ArrayLike | None = None
) -> dict[str, float]:
    """All CTR metrics at once.

    Parameters
    ----------
    labels : array-like of shape (n,)
        Binary labels, each 0 or 1; both classes must occur (for AUC).
    probs : array-like of shape (n,)
        Predicted click probabilities in ``[0, 1]``.
    users : array-like of shape (n,), optional
        User of each impression; when given, ``"gauc"`` is reported too.

    Returns
    -------
    dict of str to float
        ``{"auc": ..., "logloss": ...}`` plus ``"gauc"`` when ``users`` is
        given. ``"gauc"`` is ``nan`` (not ``None``) when no user has both
        classes.

    Raises
    ------
    ValueError
        As :func:`auc`, :func:`logloss` and :func:`gauc` do.
    """
    out = {"auc": auc(labels, probs), "logloss": logloss(labels, probs)}
    if users is not None:
        out["gauc"] = gauc(users, labels, probs)
    return out


# ---------------------------------------------------------------------------
# ranks for the top-K protocol
# ---------------------------------------------------------------------------


def _ranks_at(scores: np.ndarray, target_cols: np.ndarray) -> np.ndarray:
    """Rank of ``scores[i, target_cols[i]]`` within row ``i``; nan/-inf others excluded."""
    n = scores.shape[0]
    target = scores[np.arange(n), target_cols]
    if np.any(np.isnan(target)):
        row = int(np.flatnonzero(np.isnan(target))[0])
        raise ValueError(f"target score is nan in row {row}")
    t = target[:, None]
    # nan compares False and -inf is never strictly greater, so both drop out.
    greater = np.count_nonzero(scores > t, axis=1)
    # The target equals itself, hence the -1; when the target is -inf the
    # other -inf candidates are excluded rather than tied.
    equal = np.count_nonzero(scores == t, axis=1) - 1
    equal = np.where(np.isneginf(target), 0, equal)
    return greater + 0.5 * equal


def _matrix(x: ArrayLike, name: str) -> np.ndarray:
    arr = _to_numpy(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    return arr


def rank_of_target(scores: ArrayLike, target_index: int = 0) -> np.ndarray:
    """0-based rank of the target column among each row's candidates.

    ``rank = #(candidates scoring strictly higher than the target)
    + 0.5 * #(other candidates scoring exactly as the target)``, i.e. the
    expected rank under random tie-breaking. Non-target candidates scored
    ``nan`` or ``-inf`` are excluded (neither higher nor tied).

    Parameters
    ----------
    scores : array-like of shape (n, C)
        Candidate scores, one row per evaluation case.
    target_index : int, default 0
        Column that holds the held-out target item.

    Returns
    -------
    numpy.ndarray of shape (n,), dtype float64
        Ranks in ``[0, C - 1]``; multiples of 0.5.

    Raises
    ------
    ValueError
        If ``scores`` is not 2-D, ``target_index`` is out of range, or a
        target score is ``nan``.
    """
    s = _matrix(scores, "scores")
    c = s.shape[1]
    if not -c <= target_index < c:
        raise ValueError(f"target_index {target_index} out of range for {c} candidates")
    cols = np.full(s.shape[0], target_index % c, dtype=np.int64)
    return _ranks_at(s, cols).astype(np.float64)


def sampled_ranking_ranks(target_scores: ArrayLike, negative_scores: ArrayLike) -> np.ndarray:
    """0-based rank of each target against its sampled negatives.

    ``rank = #(negatives scoring strictly higher) + 0.5 * #(negatives scoring
    equal)``; negatives scored ``nan`` or ``-inf`` are excluded.

    Parameters
    ----------
    target_scores : array-like of shape (n,)
        Score of the held-out target item of each row.
    negative_scores : array-like of shape (n, N)
        Scores of the ``N`` negatives sampled for each row.

    Returns
    -------
    numpy.ndarray of shape (n,), dtype float64
        Ranks in ``[0, N]``.

    Raises
    ------
    ValueError
        If the shapes disagree or a target score is ``nan``.
    """
    t = _vector(target_scores, "target_scores")
    neg = _matrix(negative_scores, "negative_scores")
    if neg.shape[0] != t.shape[0]:
        raise ValueError(
            f"target_scores and negative_scores differ in rows: {t.shape[0]} vs {neg.shape[0]}"
        )
    dtype = np.result_type(t.dtype, neg.dtype, np.float32)
    both = np.concatenate([t.astype(dtype)[:, None], neg.astype(dtype)], axis=1)
    return _ranks_at(both, np.zeros(t.shape[0], dtype=np.int64)).astype(np.float64)


def _exclusion_coords(
    exclude: Any, n: int, width: int
) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
    """Normalise ``exclude`` to a boolean mask or to (rows, cols) coordinates."""
    if isinstance(exclude, tuple):
        if len(exclude) != 2:
            raise ValueError("exclude as a tuple must be the CSR pair (indptr, indices)")
        indptr = _vector(exclude[0], "exclude indptr").astype(np.int64)
        indices = _vector(exclude[1], "exclude indices").astype(np.int64)
        if indptr.shape[0] != n + 1:
            raise ValueError(f"exclude indptr must have {n + 1} entries, got {indptr.shape[0]}")
        if indptr[0] != 0 or indptr[-1] != indices.shape[0] or np.any(np.diff(indptr) < 0):
            raise ValueError(
                "exclude indptr must start at 0, be non-decreasing and end at len(indices)"
            )
        rows = np.repeat(np.arange(n), np.diff(indptr))
        cols = indices
    else:
        if hasattr(exclude, "detach") or isinstance(exclude, np.ndarray):
            mask = _to_numpy(exclude)
        else:
            try:
                mask = np.asarray(exclude)
            except ValueError:  # ragged per-row lists
                mask = None
        if mask is not None and mask.dtype == bool:
            if mask.shape != (n, width):
                raise ValueError(f"exclude mask must have shape {(n, width)}, got {mask.shape}")
            return mask
        per_row_error = ValueError(
            "exclude must be a CSR pair (indptr, indices), a boolean mask "
            f"or a list of {n} per-row item-id lists"
        )
        if isinstance(exclude, np.ndarray) or hasattr(exclude, "detach"):
            raise per_row_error
        if not isinstance(exclude, Sequence) or len(exclude) != n:
            raise per_row_error
        try:
            row_items = [np.asarray(r, dtype=np.int64).reshape(-1) for r in exclude]
        except (TypeError, ValueError):
            raise per_row_error from None
        lengths = np.array([r.shape[0] for r in row_items], dtype=np.int64)
        rows = np.repeat(np.arange(n), lengths)
        cols = np.concatenate(row_items) if n else np.zeros(0, dtype=np.int64)
    if cols.size and (cols.min() < 0 or cols.max() >= width):
        raise ValueError(f"exclude item ids must lie in [0, {width - 1}]")
    return rows, cols


def _mask_excluded(work: np.ndarray, exclude, n: int, width: int) -> None:
    """Set the scores of each row's excluded items (``exclude``, see :func:`full_ranking_ranks`)
    to ``-inf`` in place."""
    coords = _exclusion_coords(exclude, n, width)
    if isinstance(coords, np.ndarray):
        work[coords] = -np.inf
    else:
        work[coords[0], coords[1]] = -np.inf


def full_ranking_ranks(
    scores: ArrayLike, targets: ArrayLike, exclude: Any = None
) -> np.ndarray:
    """0-based rank of each target among all items (full ranking).

    Column 0 is the padding item and is always excluded. Items named by
    ``exclude`` (typically the user's training items) are excluded too, by
    setting their scores to ``-inf`` on a copy of ``scores``. The target item
    of a row is **never** excluded, even if ``exclude`` lists it for that
    row. Ranks then follow :func:`rank_of_target`: strictly higher items plus
    half the equally scored other items; items already scored ``nan`` or
    ``-inf`` are excluded as well.

    Parameters
    ----------
    scores : array-like of shape (n, num_items + 1)
        Score of every item for each row; column ``i`` is item id ``i``.
    targets : array-like of int, shape (n,)
        Held-out target item id of each row, in ``[1, num_items]``.
    exclude : optional
        Items to exclude per row, either

        * a CSR pair ``(indptr, indices)`` (a ``tuple``) with
          ``len(indptr) == n + 1``: row ``i`` excludes
          ``indices[indptr[i]:indptr[i + 1]]``;
        * a boolean mask of shape ``(n, num_items + 1)``, ``True`` = exclude;
        * a list of ``n`` sequences of item ids.

    Returns
    -------
    numpy.ndarray of shape (n,), dtype float64
        Ranks in ``[0, num_items - 1]``.

    Raises
    ------
    ValueError
        If shapes disagree, a target is out of ``[1, num_items]``, an excluded
        item id is out of range, or a target score is ``nan``.
    """
    s = _matrix(scores, "scores")
    n, width = s.shape
    t = _vector(targets, "targets")
    if t.shape[0] != n:
        raise ValueError(f"scores and targets differ in rows: {n} vs {t.shape[0]}")
    if t.dtype.kind not in "iu":
        if t.dtype.kind == "f" and np.all(np.isfinite(t)) and np.all(t == np.round(t)):
            t = t.astype(np.int64)
        else:
            raise ValueError(f"targets must be integer item ids, got dtype {t.dtype}")
    t = t.astype(np.int64)
    if n and (t.min() < 1 or t.max() >= width):
        raise ValueError(f"targets must lie in [1, {width - 1}] (0 is the padding item)")

    work = s.astype(np.result_type(s.dtype, np.float32), copy=True)
    rows = np.arange(n)
    target_scores = work[rows, t].copy()
    work[:, 0] = -np.inf
    if exclude is not None:
        _mask_excluded(work, exclude, n, width)
    work[rows, t] = target_scores  # the target is never excluded
    return _ranks_at(work, t).astype(np.float64)


# ---------------------------------------------------------------------------
# metrics from ranks
# ---------------------------------------------------------------------------


def _check_ranks(ranks: ArrayLike) -> np.ndarray:
    r = _to_numpy(ranks)
    if r.ndim != 1:
        raise ValueError(f"ranks must be 1-D, got shape {r.shape}")
    if r.size == 0:
        raise ValueError("ranks are empty")
    r = r.astype(np.float64)
    if not np.all(np.isfinite(r)) or np.any(r < 0):
        raise ValueError("ranks must be finite and non-negative")
    return r


def _check_k(k: int) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def hit_rate(ranks: ArrayLike, k: int) -> float:
    """Hit rate at ``k``: the fraction of rows whose target ranks in the top ``k``.

    Parameters
    ----------
    ranks : array-like of shape (n,)
        0-based target ranks, possibly fractional (ties).
    k : int
        Cut-off; a row is a hit when ``rank < k``.

    Returns
    -------
    float
        HR@k in ``[0, 1]``.

    Raises
    ------
    ValueError
        If ``ranks`` is empty, not 1-D, negative or non-finite, or ``k < 1``.
    """
    r = _check_ranks(ranks)
    k = _check_k(k)
    return float(np.mean(r < k))


def ndcg(ranks: ArrayLike, k: int) -> float:
    """NDCG at ``k`` for a single relevant item per row.

    Each row contributes ``1 / log2(rank + 2)`` if ``rank < k`` and 0
    otherwise (the ideal DCG is 1). Fractional ranks from ties use the same
    formula.

    Parameters
    ----------
    ranks : array-like of shape (n,)
        0-based target ranks.
    k : int
        Cut-off.

    Returns
    -------
    float
        Mean NDCG@k in ``[0, 1]``.

    Raises
    ------
    ValueError
        If ``ranks`` is empty, not 1-D, negative or non-finite, or ``k < 1``.
    """
    r = _check_ranks(ranks)
    k = _check_k(k)
    return float(np.mean(np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)))


def mrr(ranks: ArrayLike) -> float:
    """Mean reciprocal rank: the mean of ``1 / (rank + 1)`` (no cut-off).

    Parameters
    ----------
    ranks : array-like of shape (n,)
        0-based target ranks.

    Returns
    -------
    float
        MRR in ``(0, 1]``.

    Raises
    ------
    ValueError
        If ``ranks`` is empty, not 1-D, negative or non-finite.
    """
    r = _check_ranks(ranks)
    return float(np.mean(1.0 / (r + 1.0)))


def ranking_metrics(ranks: ArrayLike, ks: Sequence[int] = (5, 10, 20)) -> dict[str, float]:
    """HR@K and NDCG@K for every ``K`` in ``ks``, plus MRR.

    Parameters
    ----------
    ranks : array-like of shape (n,)
        0-based target ranks, e.g. from :func:`full_ranking_ranks`.
    ks : sequence of int, default (5, 10, 20)
        Cut-offs.

    Returns
    -------
    dict of str to float
        Keys ``"hr@K"`` and ``"ndcg@K"`` for each ``K`` (in the order of
        ``ks``), then ``"mrr"``.

    Raises
    ------
    ValueError
        As :func:`hit_rate` and :func:`ndcg` do.
    """
    r = _check_ranks(ranks)
    out: dict[str, float] = {}
    for k in ks:
        k = _check_k(k)
        out[f"hr@{k}"] = hit_rate(r, k)
        out[f"ndcg@{k}"] = ndcg(r, k)
    out["mrr"] = mrr(r)
    return out


def domain_ranking_metrics(ranks: ArrayLike, domains: ArrayLike, names: Sequence[str],
                           cold: ArrayLike | None = None, ks: Sequence[int] = (5, 10, 20)) -> dict[str, float]:
    """Ranking metrics per domain (cross-domain recommendation).

    ``ranks`` (n,) 0-based ranks, ``domains`` (n,) the domain index of each example into
    ``names``, ``cold`` (n,) optional booleans marking cold-start examples. Returns, per
    domain with examples, :func:`ranking_metrics` under ``NAME/`` and, where it has cold
    examples, under ``NAME/cold/``; the unprefixed keys are the means over the domains with
    examples (each domain counts once, whatever its size).
    """
    r = np.asarray(ranks, dtype=np.float64)
    d = np.asarray(domains, dtype=np.int64)
    if r.shape != d.shape:
        raise ValueError(f"ranks and domains must have the same shape (got {r.shape} and {d.shape})")
    c = np.zeros(r.shape, dtype=bool) if cold is None else np.asarray(cold, dtype=bool)
    out: dict[str, float] = {}
    per_domain = []
    for k, name in enumerate(names):
        sel = d == k
        if not sel.any():
            continue
        m = ranking_metrics(r[sel], ks)
        per_domain.append(m)
        out.update({f"{name}/{key}": v for key, v in m.items()})
        if (sel & c).any():
            out.update({f"{name}/cold/{key}": v for key, v in ranking_metrics(r[sel & c], ks).items()})
    if per_domain:
        mean = {key: float(np.mean([m[key] for m in per_domain])) for key in per_domain[0]}
        out = {**mean, **out}
    return out


# ---------------------------------------------------------------------------
# top-K metrics: several relevant items per user, coverage, the K list
# ---------------------------------------------------------------------------


def parse_topk(value: Any) -> tuple[int, ...]:
    """A K list from ``value``: a sequence of ints or a comma-separated string
    (``"5,10,20"``); duplicates are dropped, the order is kept.

    Raises
    ------
    ValueError
        If the list is empty or a K is not a positive integer (one line, naming it).
    """
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        if not value.strip() or any(not p for p in parts):
            raise ValueError(f"expected a comma-separated list of positive integers, e.g. 5,10,20 (got {value!r})")
        out = []
        for p in parts:
            try:
                out.append(int(p))
            except ValueError:
                raise ValueError(f"K must be a positive integer (got {p!r})") from None
    elif isinstance(value, (list, tuple)):
        out = list(value)
    elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        out = [value]
    else:
        raise ValueError(f"expected a list of positive integers, e.g. [5, 10, 20] (got {value!r})")
    if not out:
        raise ValueError("the K list is empty (expected positive integers, e.g. 5,10,20)")
    for k in out:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"K must be a positive integer (got {k!r})")
    return tuple(dict.fromkeys(int(k) for k in out))


def top_k_items(scores: ArrayLike, k: int, exclude: Any = None) -> np.ndarray:
    """The ``k`` highest-scored items of each row, best first (full ranking).

    Column 0 (padding), the items named by ``exclude`` (as in
    :func:`full_ranking_ranks`: a CSR pair, a boolean mask or per-row lists) and
    items scored ``nan`` or ``-inf`` are never in a list. Ties are broken by the
    lower item id, so the lists are deterministic.

    Returns
    -------
    numpy.ndarray of shape (n, k), dtype int64
        Item ids; ``-1`` fills a row with fewer than ``k`` candidates.
    """
    s = _matrix(scores, "scores")
    k = _check_k(k)
    n, width = s.shape
    work = s.astype(np.float64, copy=True)
    work[np.isnan(work)] = -np.inf
    work[:, 0] = -np.inf
    if exclude is not None:
        _mask_excluded(work, exclude, n, width)
    out = np.full((n, k), -1, dtype=np.int64)
    if n == 0 or width <= 1:
        return out
    kk = min(k, width)
    # the kk-th largest score of each row; everything above it is in, ties at it by id
    kth = -np.partition(-work, kk - 1, axis=1)[:, kk - 1]
    above = work > kth[:, None]
    tied = work == kth[:, None]
    need = kk - above.sum(axis=1)
    chosen = (above | (tied & (np.cumsum(tied, axis=1) <= need[:, None]))) & (work > -np.inf)
    rows, cols = np.nonzero(chosen)
    # order each row's chosen items by (score descending, id ascending)
    order = np.lexsort((cols, -work[rows, cols], rows))
    rows, cols = rows[order], cols[order]
    starts = np.searchsorted(rows, np.arange(n))
    pos = np.arange(rows.size) - starts[rows]
    out[rows, pos] = cols
    return out


def item_coverage(top_items: ArrayLike, n_items: int, ks: Sequence[int] = DEFAULT_TOPK) -> dict[str, float]:
    """Item coverage@K for every ``K`` in ``ks``: the share of the ``n_items``
    catalogue items (ids ``1..n_items``) in at least one row's top-K list.

    ``top_items`` is the ``(n, K_max)`` output of :func:`top_k_items` (best first,
    ``-1`` padding) with ``K_max >= max(ks)``; the top-K list of a row is its first
    ``K`` entries. Returns ``{"coverage@K": ...}``.
    """
    top = _matrix(top_items, "top_items").astype(np.int64)
    ks = parse_topk(list(ks))
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1 (got {n_items})")
    if max(ks) > top.shape[1]:
        raise ValueError(f"top_items hold {top.shape[1]} items per row, coverage@{max(ks)} needs {max(ks)}")
    return {f"coverage@{k}": item_coverage_from_counts(top_item_counts(top, n_items, k), n_items) for k in ks}


def top_item_counts(top_items: np.ndarray, n_items: int, k: int) -> np.ndarray:
    """``(n_items + 1,)`` int64: in how many rows' top-``k`` lists each item appears
    (column 0 unused). These counts add up over clients (federated coverage)."""
    top = np.asarray(top_items, dtype=np.int64)[:, :k].reshape(-1)
    return np.bincount(top[top > 0], minlength=n_items + 1).astype(np.int64)


def item_coverage_from_counts(counts: ArrayLike, n_items: int) -> float:
    """The share of items ``1..n_items`` with a non-zero count (see :func:`top_item_counts`)."""
    c = np.asarray(counts)
    return float(np.count_nonzero(c[1 : n_items + 1]) / n_items)


def per_user_topk(ranks: ArrayLike, ks: Sequence[int] = DEFAULT_TOPK,
                  groups: ArrayLike | None = None) -> dict[str, np.ndarray]:
    """Per-user values of the top-K metrics (see the module docstring), before averaging.

    ``ranks`` (n,): each relevant item's 0-based position in its user's ranked list;
    ``groups`` (n,): the user of each row (``None``: every row its own user, one relevant
    item each). Returns ``{"hr@K": (users,), "ndcg@K", "recall@K", "precision@K",
    "map@K", ..., "mrr": (users,)}``, users in increasing order of their group value.
    With ``groups=None`` the values are computed with exactly the formulas of
    :func:`hit_rate`, :func:`ndcg` and :func:`mrr`.
    """
    r = _check_ranks(ranks)
    ks = parse_topk(list(ks))
    out: dict[str, np.ndarray] = {}
    if groups is None:
        for k in ks:
            hit = r < k
            out[f"hr@{k}"] = hit.astype(np.float64)
            out[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(r + 2.0), 0.0)
            out[f"recall@{k}"] = hit.astype(np.float64)
            out[f"precision@{k}"] = hit / float(k)
            out[f"map@{k}"] = np.where(hit, 1.0 / (r + 1.0), 0.0)
        out["mrr"] = 1.0 / (r + 1.0)
        return out
    g = _vector(groups, "groups")
    if g.shape[0] != r.shape[0]:
        raise ValueError(f"ranks and groups differ in length: {r.shape[0]} vs {g.shape[0]}")
    _, gid = np.unique(g, return_inverse=True)
    gid = gid.reshape(-1)
    order = np.lexsort((r, gid))
    gid, r = gid[order], r[order]
    n_groups = int(gid.max()) + 1
    m = np.bincount(gid, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(m)[:-1]])
    j = np.arange(r.size) - starts[gid] + 1  # 1-based position among the user's relevant items
    gain = 1.0 / np.log2(np.arange(max(ks)) + 2.0)
    ideal = np.concatenate([[0.0], np.cumsum(gain)])  # ideal[i]: DCG of i relevant items at the top
    for k in ks:
        hit = r < k
        hits = np.bincount(gid, weights=hit, minlength=n_groups)
        dcg = np.bincount(gid, weights=np.where(hit, 1.0 / np.log2(r + 2.0), 0.0), minlength=n_groups)
        ap = np.bincount(gid, weights=np.where(hit, j / (r + 1.0), 0.0), minlength=n_groups)
        top = np.minimum(m, k)
        out[f"hr@{k}"] = (hits > 0).astype(np.float64)
        out[f"ndcg@{k}"] = dcg / ideal[top]
        out[f"recall@{k}"] = hits / m
        out[f"precision@{k}"] = hits / float(k)
        out[f"map@{k}"] = ap / top
    out["mrr"] = 1.0 / (r[starts] + 1.0)
    return out


def topk_metrics(ranks: ArrayLike, ks: Sequence[int] = DEFAULT_TOPK, *, groups: ArrayLike | None = None,
                 top_items: ArrayLike | None = None, n_items: int | None = None) -> dict[str, float]:
    """HR@K, NDCG@K, Recall@K, Precision@K, MAP@K (and item coverage@K) for every
    ``K`` in ``ks``, plus MRR, averaged over users (RecBole's definitions, see the
    module docstring).

    Parameters
    ----------
    ranks : array-like of shape (n,)
        0-based rank of each relevant item among its user's candidates (other relevant
        items of the user included), e.g. from :func:`full_ranking_ranks`.
    ks : sequence of int, default (5, 10, 20)
        Cut-offs.
    groups : array-like of shape (n,), optional
        The user of each row, when users have several relevant items (each (user,
        item) pair once). Without it every row is its own user, and ``hr@K``,
        ``ndcg@K`` and ``mrr`` equal :func:`ranking_metrics`'s exactly.
    top_items, n_items : optional
        The evaluated rows' top lists (:func:`top_k_items`, at least ``max(ks)`` wide)
        and the catalogue size: adds ``coverage@K`` (:func:`item_coverage`).

    Returns
    -------
    dict of str to float
        Per ``K`` (in the order of ``ks``): ``hr@K``, ``ndcg@K``, ``recall@K``,
        ``precision@K``, ``map@K`` and, with ``top_items``, ``coverage@K``; then ``mrr``.
    """
    ks = parse_topk(list(ks))
    per = per_user_topk(ranks, ks, groups)
    cover = item_coverage(top_items, n_items, ks) if top_items is not None else {}
    out: dict[str, float] = {}
    for k in ks:
        for name in ("hr", "ndcg", "recall", "precision", "map"):
            out[f"{name}@{k}"] = float(np.mean(per[f"{name}@{k}"]))
        if cover:
            out[f"coverage@{k}"] = cover[f"coverage@{k}"]
    out["mrr"] = float(np.mean(per["mrr"]))
    return out
