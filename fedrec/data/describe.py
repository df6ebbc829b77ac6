"""Summary statistics of a dataset, as printed by ``fedrec data describe``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from fedrec.data.interactions import SPLITS, Dataset

__all__ = ["describe"]

_PERCENTILES = (0, 25, 50, 75, 90, 100)


def _counts(frame: pd.DataFrame) -> dict[str, Any]:
    out: dict[str, Any] = {
        "users": int(frame["user"].nunique()),
        "items": int(frame["item"].nunique()),
        "interactions": int(len(frame)),
    }
    out["label_rate"] = round(float(frame["label"].mean()), 6) if "label" in frame.columns else None
    return out


def describe(dataset: Dataset) -> dict[str, Any]:
    """Statistics of ``dataset`` as a JSON-ready dict.

    Keys: ``data``, ``users``, ``items``, ``interactions``, ``density``, ``label_rate``
    (None without labels), ``rating`` (min/max/mean, or None), ``value`` (min/max/mean, only when the data has it), ``sequence_length``
    (percentiles and mean of interactions per user), ``repeated_pairs`` (rows whose
    (user, item) pair occurred before), ``time`` (min/max), ``domains`` (per-domain counts,
    None for single-domain data), ``splits`` (per-split counts when the files carry a split,
    else None), ``user_features`` / ``item_features`` (field names, or None), ``meta``.
    """
    frame = dataset.interactions.frame
    stats: dict[str, Any] = {"data": dataset.name}
    stats.update(_counts(frame))
    stats["density"] = round(stats["interactions"] / (stats["users"] * stats["items"]), 8)
    if "rating" in frame.columns:
        r = frame["rating"]
        stats["rating"] = {"min": float(r.min()), "max": float(r.max()), "mean": round(float(r.mean()), 6)}
    else:
        stats["rating"] = None
    if "value" in frame.columns:
        v = frame["value"]
        stats["value"] = {"min": float(v.min()), "max": float(v.max()), "mean": round(float(v.mean()), 6)}
    lengths = frame.groupby("user").size().to_numpy()
    pct = np.percentile(lengths, _PERCENTILES)
    stats["sequence_length"] = {f"p{p}": float(v) for p, v in zip(_PERCENTILES, pct)}
    stats["sequence_length"]["mean"] = round(float(lengths.mean()), 4)
    stats["repeated_pairs"] = int(frame.duplicated(["user", "item"]).sum())
    stats["time"] = {"min": _scalar(frame["time"].min()), "max": _scalar(frame["time"].max()),
                     "unit": dataset.meta.get("time_unit")}
    if dataset.interactions.has_domains:
        stats["domains"] = {
            name: _counts(part) | _split_counts(part)
            for name, part in frame.groupby("domain", sort=False)
        }
        shared = frame.groupby("user")["domain"].nunique()
        stats["users_in_all_domains"] = int((shared == frame["domain"].nunique()).sum())
    else:
        stats["domains"] = None
    stats["splits"] = _split_counts(frame).get("splits")
    stats["user_features"] = None if dataset.user_features is None else list(map(str, dataset.user_features.columns))
    stats["item_features"] = None if dataset.item_features is None else list(map(str, dataset.item_features.columns))
    if dataset.user_groups is not None:
        stats["true_groups"] = {str(k): int(v) for k, v in dataset.user_groups.value_counts().sort_index().items()}
    stats["meta"] = {k: v for k, v in dataset.meta.items() if isinstance(v, (str, int, float, bool, list, dict))}
    return stats


def _split_counts(frame: pd.DataFrame) -> dict[str, Any]:
    if "split" not in frame.columns:
        return {}
    return {"splits": {s: _counts(frame[frame["split"] == s]) for s in SPLITS if (frame["split"] == s).any()}}


def _scalar(value):
    value = value.item() if hasattr(value, "item") else value
    return int(value) if float(value).is_integer() else float(value)
