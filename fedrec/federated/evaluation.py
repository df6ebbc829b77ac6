"""Federated evaluation: pooled metrics from per-client summaries, never raw (score, label) pairs.

Each client evaluates its own users and sends a summary; the server combines summaries.

CTR (pooled AUC and LogLoss)
    A client sends, per label, a histogram of its scores on the **logit scale** (the
    model's logits when it gives them, else ``log(p / (1 - p))`` of its probabilities,
    computed in float64) over ``bins`` equal-width bins of ``[-LOGIT_RANGE, LOGIT_RANGE]``
    (sparse: the non-empty bins and their counts; ``logit-range`` records the scale), plus
    the sum of its examples' log losses and their number.

    * LogLoss is exact: the sum of per-example losses is additive.
    * AUC is computed from the pooled histograms, counting a positive and a negative in the
      same bin as half a correct pair. Binning is monotone in the score, so pairs in
      different bins are ordered exactly as by the raw scores; only same-bin pairs can be
      wrong, so ``|AUC_hist - AUC_exact| <= 0.5 * sum_b pos_b * neg_b / (P * N)`` — a bound
      the server computes from the histograms themselves and reports as ``auc-error-bound``.

    Why logits: probabilities saturate. A model that is confident (as DP-trained ones
    become) puts many scores within 1e-5 of 0 or 1, and equal-width probability bins lump
    them together, with bounds of 0.1 and more on real runs; on the logit scale the default
    2**16 bins are 0.0012 logits wide wherever the scores lie. Why ``LOGIT_RANGE = 40`` is
    enough: a float64 probability below 1 has a logit of at most ``log(2**53) = 36.7``, and
    the float32 sigmoid most models end in saturates at 1 beyond 16.6, so from probabilities
    nothing beyond +-40 can be told apart anyway; scores beyond it (logits given directly)
    are clipped into the end bins, which keeps the binning monotone, so the bound stays a
    true bound and says so if many pairs sit out there. The older probability-scale
    summaries (``scale="probability"``, no ``logit-range`` key) are still understood, but
    summaries of different scales or resolutions are never combined.

    What the server learns: how many of a client's examples fall in each score bin per
    label (not which user or item they belong to).

Ranking (HR@K, NDCG@K, Recall@K, Precision@K, MAP@K, MRR; coverage@K)
    Per-user values are additive (every user is evaluated on exactly one client): a client
    sends their sums (:func:`topk_summary`; the older :func:`ranking_summary` sends HR, NDCG
    and MRR only) and its user count ``n``; the pooled means are exact, and equal the
    centralised :func:`fedrec.metrics.topk_metrics` of the same model and users (several
    held-out items per user, under a ratio split, included: a user's items are summed
    on its client). Item coverage@K under full ranking: a client sends, per K, the items
    in its users' top-K lists and how many lists each is in (``coverage@K-items``,
    ``coverage@K-counts``) and the catalogue size ``n-items``; the server adds the counts,
    and coverage@K is the share of the catalogue with a non-zero count, as centrally.

    What the server learns from it: which items a client's users are recommended and how
    often (with one user per client, that user's top-K list). It is a statistic of the
    model's recommendations, not of the users' interactions, but it is per client; a
    deployment that must not reveal it evaluates under a sampled protocol (no coverage).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from fedrec.metrics import DEFAULT_TOPK, parse_topk, per_user_topk, top_item_counts

__all__ = ["ctr_summary", "combine_ctr", "ranking_summary", "topk_summary", "combine_ranking", "histogram_auc",
           "LOGIT_RANGE", "SCALES"]

DEFAULT_BINS = 1 << 16
#: the logit-scale histogram spans [-LOGIT_RANGE, LOGIT_RANGE] (see the module docstring)
LOGIT_RANGE = 40.0
SCALES = ("logit", "probability")
_EPS = 1e-7


def _bin_of(scores: np.ndarray, bins: int, scale: str) -> np.ndarray:
    """Bin index of each score: equal-width bins of [0, 1] (probabilities) or of
    [-LOGIT_RANGE, LOGIT_RANGE] (logits), out-of-range values clipped to the end bins."""
    if scale == "probability":
        unit = np.clip(scores, 0.0, 1.0)
    else:
        unit = (np.clip(scores, -LOGIT_RANGE, LOGIT_RANGE) + LOGIT_RANGE) / (2 * LOGIT_RANGE)
    return np.minimum((unit * bins).astype(np.int64), bins - 1)


def _logit(probs: np.ndarray) -> np.ndarray:
    """``log(p / (1 - p))`` in float64 (``-inf`` at 0, ``inf`` at 1)."""
    with np.errstate(divide="ignore"):
        return np.log(probs) - np.log1p(-probs)


def _sparse_hist(idx: np.ndarray) -> tuple[list[int], list[int]]:
    values, counts = np.unique(idx, return_counts=True)
    return values.tolist(), counts.tolist()


def ctr_summary(labels: np.ndarray, probs: np.ndarray, *, logits: np.ndarray | None = None,
                bins: int = DEFAULT_BINS, scale: str = "logit") -> dict[str, float | int | list[int]]:
    """One client's CTR summary (metric-record ready: ints, floats and int lists only).

    ``probs`` give the log loss; the histogram bins ``logits`` when given (the model's own,
    which do not saturate), else the logits of ``probs`` (``scale="logit"``, the default),
    or ``probs`` themselves (``scale="probability"``, the older summaries).
    """
    if scale not in SCALES:
        raise ValueError(f"unknown histogram scale {scale!r} (known: {', '.join(SCALES)})")
    if not isinstance(bins, (int, np.integer)) or isinstance(bins, bool) or bins < 1:
        raise ValueError(f"bins must be a positive integer (got {bins!r})")
    labels = np.asarray(labels).astype(bool)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.shape != probs.shape:
        raise ValueError(f"labels {labels.shape} and probs {probs.shape} differ in shape")
    if np.isnan(probs).any() or ((probs < 0) | (probs > 1)).any():
        raise ValueError("probs must be probabilities in [0, 1] (got NaN or a value outside)")
    if logits is not None:
        if scale != "logit":
            raise ValueError("logits are binned on the logit scale; do not pass them with scale='probability'")
        scores = np.asarray(logits, dtype=np.float64)
        if scores.shape != probs.shape:
            raise ValueError(f"logits {scores.shape} and probs {probs.shape} differ in shape")
        if np.isnan(scores).any():
            raise ValueError("logits contain NaN")
    else:
        scores = _logit(probs) if scale == "logit" else probs
    p = np.clip(probs, _EPS, 1 - _EPS)
    loss = -(labels * np.log(p) + (~labels) * np.log(1 - p))
    pos_bins, pos_counts = _sparse_hist(_bin_of(scores[labels], bins, scale))
    neg_bins, neg_counts = _sparse_hist(_bin_of(scores[~labels], bins, scale))
    out = {"n": int(labels.size), "logloss-sum": float(loss.sum()), "bins": int(bins),
           "pos-bins": pos_bins, "pos-counts": pos_counts, "neg-bins": neg_bins, "neg-counts": neg_counts}
    if scale == "logit":
        out["logit-range"] = LOGIT_RANGE
    return out


def histogram_auc(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """AUC from dense per-bin counts of positives and negatives, and its error bound."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    P, N = pos.sum(), neg.sum()
    if P == 0 or N == 0:
        return float("nan"), float("nan")
    neg_below = np.cumsum(neg) - neg  # negatives in strictly lower bins
    correct = (pos * (neg_below + 0.5 * neg)).sum()
    bound = 0.5 * (pos * neg).sum() / (P * N)
    return float(correct / (P * N)), float(bound)


def _scale_of(summary: Mapping) -> str:
    """How a summary's bins read: ``logit [-R, R]`` or ``probability [0, 1]``."""
    if "logit-range" in summary:
        return f"logit [-{float(summary['logit-range']):g}, {float(summary['logit-range']):g}]"
    return "probability [0, 1]"


def combine_ctr(summaries: Iterable[Mapping]) -> dict[str, float | None]:
    """Pooled ``auc``, ``logloss``, ``auc-error-bound`` and ``n`` from client summaries
    (refused, with a one-line error, when they differ in histogram scale or resolution)."""
    summaries = [s for s in summaries if int(s["n"]) > 0]
    if not summaries:
        return {"auc": None, "logloss": None, "auc-error-bound": None, "n": 0}
    scales = {_scale_of(s) for s in summaries}
    if len(scales) != 1:
        raise ValueError(f"clients binned their scores on different scales: {', '.join(sorted(scales))}")
    bins = {int(s["bins"]) for s in summaries}
    if len(bins) != 1:
        raise ValueError(f"clients used different histogram resolutions: {sorted(bins)}")
    nb = bins.pop()
    pos, neg = np.zeros(nb), np.zeros(nb)
    for s in summaries:
        np.add.at(pos, np.asarray(s["pos-bins"], dtype=np.int64), np.asarray(s["pos-counts"], dtype=np.float64))
        np.add.at(neg, np.asarray(s["neg-bins"], dtype=np.int64), np.asarray(s["neg-counts"], dtype=np.float64))
    n = sum(int(s["n"]) for s in summaries)
    value, bound = histogram_auc(pos, neg)
    return {"auc": None if np.isnan(value) else value, "logloss": sum(float(s["logloss-sum"]) for s in summaries) / n,
            "auc-error-bound": None if np.isnan(bound) else bound, "n": n}


def ranking_summary(ranks: np.ndarray, ks: Sequence[int] = (5, 10, 20)) -> dict[str, float | int]:
    """One client's ranking summary: sums of per-example HR@K, NDCG@K and reciprocal rank."""
    r = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float | int] = {"n": int(r.size)}
    for k in ks:
        hit = r < k
        out[f"hr@{k}-sum"] = float(hit.sum())
        out[f"ndcg@{k}-sum"] = float((hit / np.log2(r + 2.0)).sum())
    out["mrr-sum"] = float((1.0 / (r + 1.0)).sum())
    return out


def topk_summary(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_TOPK, *, groups: np.ndarray | None = None,
                 top_items: np.ndarray | None = None, n_items: int | None = None) -> dict[str, float | int | list[int]]:
    """One client's top-K summary: ``n`` (its users) and the sums over them of the per-user
    values of :func:`fedrec.metrics.per_user_topk` (``hr@K-sum``, ``ndcg@K-sum``,
    ``recall@K-sum``, ``precision@K-sum``, ``map@K-sum``, ``mrr-sum``); with ``top_items``
    (the rows' top lists, full ranking) and ``n_items``, ``n-items`` and per K the sparse
    top-K counts ``coverage@K-items`` / ``coverage@K-counts``. ``ranks`` and ``groups`` as
    in :func:`fedrec.metrics.topk_metrics`."""
    ks = parse_topk(list(ks))
    r = np.asarray(ranks, dtype=np.float64)
    if r.size:
        per = per_user_topk(r, ks, groups)
    else:
        names = [f"{m}@{k}" for k in ks for m in ("hr", "ndcg", "recall", "precision", "map")] + ["mrr"]
        per = {name: np.zeros(0) for name in names}
    out: dict[str, float | int | list[int]] = {"n": int(len(per["mrr"]))}
    out.update({f"{key}-sum": float(values.sum()) for key, values in per.items()})
    if top_items is not None and r.size:
        if n_items is None:
            raise ValueError("top_items need n_items (the catalogue size)")
        out["n-items"] = int(n_items)
        for k in ks:
            counts = top_item_counts(top_items, n_items, k)
            items = np.flatnonzero(counts)
            out[f"coverage@{k}-items"] = items.tolist()
            out[f"coverage@{k}-counts"] = counts[items].tolist()
    return out


_ORDER = ("hr", "ndcg", "recall", "precision", "map", "coverage")


def _key_order(key: str) -> tuple:
    """Pooled keys as :func:`fedrec.metrics.topk_metrics` orders them: per K the metrics,
    then ``mrr``."""
    if "@" not in key:
        return (1, 0, 0)
    name, k = key.split("@", 1)
    return (0, int(k), _ORDER.index(name) if name in _ORDER else len(_ORDER))


def _coverage(summaries: list[Mapping]) -> dict[str, float]:
    """Pooled ``coverage@K`` from the clients' sparse top-K counts (none without them)."""
    ks = sorted({int(k[len("coverage@"):-len("-items")]) for s in summaries for k in s
                 if k.startswith("coverage@") and k.endswith("-items")})
    if not ks:
        return {}
    sizes = {int(s["n-items"]) for s in summaries if "n-items" in s}
    if len(sizes) != 1:
        raise ValueError(f"clients rank different catalogues: {sorted(sizes)} items")
    n_items = sizes.pop()
    out = {}
    for k in ks:
        counts = np.zeros(n_items + 1, dtype=np.int64)
        for s in summaries:
            if f"coverage@{k}-items" in s:
                np.add.at(counts, np.asarray(s[f"coverage@{k}-items"], dtype=np.int64),
                          np.asarray(s[f"coverage@{k}-counts"], dtype=np.int64))
        out[f"coverage@{k}"] = float(np.count_nonzero(counts[1:]) / n_items)
    return out


def combine_ranking(summaries: Iterable[Mapping]) -> dict[str, float | None]:
    """Pooled means of the ranking metrics from client summaries.

    Cross-domain summaries (keys ``NAME/...-sum`` with their own ``NAME/n``, and
    ``NAME/cold/...``) are pooled per prefix; the unprefixed metrics are then the means over
    the domains (each domain once), as :func:`fedrec.metrics.domain_ranking_metrics` gives
    them centrally."""
    summaries = list(summaries)
    prefixes = sorted({k.rsplit("/", 1)[0] for s in summaries for k in s if "/" in k and k.endswith("/n")})
    if prefixes:
        out: dict[str, float | None] = {}
        for prefix in prefixes:
            cut = len(prefix) + 1
            part = [{k[cut:]: v for k, v in s.items() if k.startswith(prefix + "/") and "/" not in k[cut:]}
                    for s in summaries]
            pooled = combine_ranking([p for p in part if p])
            out.update({f"{prefix}/{k}": v for k, v in pooled.items()})
        domains = [p for p in prefixes if "/" not in p]
        keys = [k[len(domains[0]) + 1:] for k in out if k.startswith(domains[0] + "/") and k.count("/") == 1
                and not k.endswith("/n")]
        mean = {k: (float(np.mean([out[f"{d}/{k}"] for d in domains])) if all(out.get(f"{d}/{k}") is not None
                                                                                 for d in domains) else None)
                for k in keys}
        mean["n"] = sum(int(s.get("n", 0)) for s in summaries)
        return {**mean, **out}
    n = sum(int(s["n"]) for s in summaries)
    sums = {k[:-4] for s in summaries for k in s if k.endswith("-sum")}
    coverage = _coverage([s for s in summaries if int(s["n"]) > 0])
    keys = sorted(sums | set(coverage), key=_key_order)
    out: dict[str, float | None] = {
        k: coverage[k] if k in coverage else (sum(float(s.get(k + "-sum", 0.0)) for s in summaries) / n if n else None)
        for k in keys}
    out["n"] = n
    return out
