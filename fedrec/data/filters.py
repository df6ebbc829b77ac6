"""Filters on a :class:`~fedrec.data.Dataset` that keep its side tables consistent."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from fedrec.data.interactions import Dataset, Interactions
from fedrec.errors import DataError

__all__ = ["filter_min_counts", "subset_rows", "add_sampled_negatives"]


def subset_rows(dataset: Dataset, keep: np.ndarray) -> Dataset:
    """The dataset restricted to the interaction rows where ``keep`` is true."""
    frame = dataset.interactions.frame.loc[keep].reset_index(drop=True)
    if len(frame) == 0:
        raise DataError("no interactions left after filtering", file=dataset.name)
    users = np.unique(frame["user"].to_numpy())
    return replace(
        dataset,
        interactions=Interactions(frame, dataset.interactions.source),
        user_features=None if dataset.user_features is None else dataset.user_features.loc[dataset.user_features.index.isin(users)],
        user_groups=None if dataset.user_groups is None else dataset.user_groups.loc[dataset.user_groups.index.isin(users)],
    )


def filter_min_counts(dataset: Dataset, *, min_user: int = 1, min_item: int = 1) -> Dataset:
    """Drop items with fewer than ``min_item`` rows, then users with fewer than ``min_user``.

    One pass each (not an iterated k-core). Raises :class:`DataError` when nothing is left,
    naming the thresholds.
    """
    frame = dataset.interactions.frame
    keep = np.ones(len(frame), dtype=bool)
    if min_item > 1:
        counts = frame.groupby("item")["item"].transform("size").to_numpy()
        keep &= counts >= min_item
    if min_user > 1:
        counts = frame.loc[keep].groupby("user")["user"].transform("size")
        user_ok = np.zeros(len(frame), dtype=bool)
        user_ok[np.flatnonzero(keep)] = counts.to_numpy() >= min_user
        keep &= user_ok
    if not keep.any():
        raise DataError(
            f"no interactions left after filtering (min_user={min_user}, min_item={min_item})",
            file=dataset.name,
        )
    return subset_rows(dataset, keep)


def add_sampled_negatives(dataset: Dataset, k: int, *, seed: int = 0) -> Dataset:
    """Implicit feedback cast as CTR: every row becomes a click (label 1) followed by ``k``
    non-clicks (label 0) of the same user, time, domain and split, each an item drawn
    uniformly (with replacement across the ``k``) among the items of the row's domain that
    the user never interacted with in that domain. Data that already has labels is refused."""
    inter = dataset.interactions
    if inter.has_labels:
        raise DataError("the data already has click labels: ctr_negatives is for implicit feedback", file=dataset.name)
    if not inter.has_split:
        # leave-last-two-out would hold out the last rows by time: a click's sampled non-clicks
        raise DataError("ctr_negatives needs data whose files fix their own train/valid/test split (cdr:, or a "
                        "csv/parquet 'split' column): otherwise the held-out rows would be sampled non-clicks",
                        file=dataset.name)
    frame = inter.frame
    rng = np.random.default_rng(seed)
    domain = frame["domain"].to_numpy() if inter.has_domains else np.zeros(len(frame), dtype=object)
    users = frame["user"].to_numpy(np.int64)
    items = frame["item"].to_numpy(np.int64)
    negatives = np.zeros((len(frame), k), dtype=np.int64)
    for d in pd.unique(domain):
        rows = np.flatnonzero(domain == d)
        pool = np.unique(items[rows])
        seen = np.unique(users[rows] * (int(items.max()) + 1) + items[rows])
        stride = int(items.max()) + 1
        u = np.repeat(users[rows], k)
        draw = pool[rng.integers(len(pool), size=len(u))]
        for _ in range(50):
            bad = np.isin(u * stride + draw, seen)
            if not bad.any():
                break
            draw[bad] = pool[rng.integers(len(pool), size=int(bad.sum()))]
        bad = np.isin(u * stride + draw, seen)
        for j in np.flatnonzero(bad):  # users who saw most of the pool: draw from exactly what they did not
            mine = seen[(seen >= u[j] * stride) & (seen < (u[j] + 1) * stride)] - u[j] * stride
            unseen = np.setdiff1d(pool, mine)
            if unseen.size == 0:
                raise DataError(f"ctr_negatives: user {int(u[j])} has interacted with every item of domain {d!r}: "
                                "no non-click to sample", file=dataset.name)
            draw[j] = unseen[rng.integers(unseen.size)]
        negatives[rows] = draw.reshape(len(rows), k)
    pos = frame.assign(label=np.ones(len(frame), dtype=np.int8))
    neg = frame.loc[np.repeat(np.arange(len(frame)), k)].reset_index(drop=True)
    neg["item"] = negatives.reshape(-1)
    neg["label"] = np.zeros(len(neg), dtype=np.int8)
    # each click followed by its non-clicks (the split sorts stably by time: ties keep this order)
    combined = pd.concat([pos, neg], ignore_index=True)
    position = np.empty(len(combined), dtype=np.int64)
    position[: len(frame)] = np.arange(len(frame)) * (k + 1)
    position[len(frame):] = (np.repeat(np.arange(len(frame)), k) * (k + 1) + 1 + np.tile(np.arange(k), len(frame)))
    combined = combined.iloc[np.argsort(position, kind="stable")].reset_index(drop=True)
    meta = {**dataset.meta, "ctr_negatives": k}
    return replace(dataset, interactions=Interactions.from_frame(combined, source=inter.source), meta=meta)
