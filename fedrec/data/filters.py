"""Filters on a :class:`~fedrec.data.Dataset` that keep its side tables consistent."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedrec.data.interactions import Dataset, Interactions
from fedrec.errors import DataError

__all__ = ["filter_min_counts", "subset_rows"]


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
