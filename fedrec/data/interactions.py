"""The canonical interactions table and the dataset bundle every source returns.

Columns of :class:`Interactions` (one row per exposure or interaction):

========  ========  ==========================================================
column    dtype     meaning
========  ========  ==========================================================
user      int64     raw user id (as in the source; remapped later by a split)
item      int64     raw item id
time      int64 or  timestamp, or the position within the user's file order
          float64   when the source has no time
label     int8      optional: 1 click / positive, 0 non-click / negative exposure
rating    float64   optional: explicit rating
value     float64   optional: a per-interaction regression target, e.g. a watch time
                    (CRM's condition; RecFlow's ``playing_time``)
domain    object    optional: domain name (cross-domain data)
split     object    optional: the files' own split, "train" / "valid" / "test"
========  ========  ==========================================================

Rows are kept in file order; sorting by time happens in :mod:`fedrec.data.split`,
stably, so ties keep their file order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from fedrec.data.io import int_column
from fedrec.errors import DataError

__all__ = ["Interactions", "Dataset", "REQUIRED", "OPTIONAL", "SPLITS"]

REQUIRED = ("user", "item", "time")
OPTIONAL = ("label", "rating", "value", "domain", "split")
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Interactions:
    """A validated canonical interactions table (see the module docstring).

    Construct through :meth:`from_frame`, which checks columns, dtypes and values and
    raises :class:`~fedrec.errors.DataError` naming ``source`` on a violation.
    """

    frame: pd.DataFrame
    source: str = ""

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, *, source: str) -> "Interactions":
        """Validate ``frame`` and wrap it; ``source`` names the file(s) for error messages."""
        missing = [c for c in REQUIRED if c not in frame.columns]
        if missing:
            raise DataError("missing required column", file=source, column=missing[0])
        extra = [c for c in frame.columns if c not in REQUIRED + OPTIONAL]
        if extra:
            raise DataError("unexpected column in canonical table", file=source, column=extra[0])
        if len(frame) == 0:
            raise DataError("no interactions", file=source)
        out = pd.DataFrame(index=pd.RangeIndex(len(frame)))
        rows = np.arange(1, len(frame) + 1)  # in-memory tables: "line" = 1-based row
        for col in ("user", "item"):
            out[col] = int_column(frame, col, rows, source)
        time = frame["time"]
        if not pd.api.types.is_numeric_dtype(time):
            time = pd.to_numeric(time, errors="coerce")
        _no_nan(time, "time", source)
        out["time"] = time.to_numpy()
        if "label" in frame.columns:
            label = frame["label"]
            if not pd.api.types.is_numeric_dtype(label):
                label = pd.to_numeric(label, errors="coerce")
            _no_nan(label, "label", source)
            bad = ~np.isin(label.to_numpy(), (0, 1))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise DataError(
                    "label must be 0 or 1", file=source, column="label", value=label.iloc[i]
                )
            out["label"] = label.to_numpy().astype(np.int8)
        if "rating" in frame.columns:
            rating = pd.to_numeric(frame["rating"], errors="coerce")
            _no_nan(rating, "rating", source)
            out["rating"] = rating.to_numpy(dtype=np.float64)
        if "value" in frame.columns:
            value = pd.to_numeric(frame["value"], errors="coerce")
            _no_nan(value, "value", source)
            bad = ~np.isfinite(value.to_numpy(dtype=np.float64))
            if bad.any():
                raise DataError("value must be finite", file=source, column="value",
                                value=value.iloc[int(np.flatnonzero(bad)[0])])
            out["value"] = value.to_numpy(dtype=np.float64)
        if "domain" in frame.columns:
            out["domain"] = frame["domain"].astype(str).to_numpy()
        if "split" in frame.columns:
            split = frame["split"].astype(str)
            bad = ~split.isin(SPLITS)
            if bad.any():
                raise DataError(
                    "split must be train, valid or test",
                    file=source,
                    column="split",
                    value=split[bad].iloc[0],
                )
            out["split"] = split.to_numpy()
        return cls(out, source)

    # -- convenience -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.frame)

    @property
    def has_labels(self) -> bool:
        """Whether rows carry an explicit 0/1 label (otherwise all are implicit positives)."""
        return "label" in self.frame.columns

    @property
    def has_domains(self) -> bool:
        """Whether rows carry a domain (cross-domain data)."""
        return "domain" in self.frame.columns

    @property
    def has_split(self) -> bool:
        """Whether the files fixed their own train/valid/test split."""
        return "split" in self.frame.columns

    @property
    def domains(self) -> list[str]:
        """Domain names in order of first appearance (empty for single-domain data)."""
        if not self.has_domains:
            return []
        return list(pd.unique(self.frame["domain"]))


@dataclass
class Dataset:
    """What a source returns: interactions plus optional side tables.

    Attributes
    ----------
    name:
        The spec it was loaded from.
    interactions:
        The canonical :class:`Interactions` table.
    user_features, item_features:
        Optional integer-coded feature tables indexed by raw user / item id (one column
        per categorical field; code 0 is free for padding: codes are shifted by +1 when the
        source's codes start at 0).
    user_groups:
        Optional true latent group per raw user id (synthetic data), for scoring group
        discovery.
    item_text:
        Optional item content as text per raw item id (MovieLens: title and genres), what a
        content encoder reads (QARM).
    stage_samples:
        Optional candidates a recommender funnel filtered out before exposure (RecFlow):
        ``user``, ``item`` (raw ids), ``time`` (the request's time, as in the
        interactions) and ``stage`` (1 pre-ranking .. 4 re-ranking: the deepest stage the
        item reached). Not interactions: only stage-aware training reads them.
    meta:
        Free-form facts about the source (generative parameters, thresholds, ...).
    """

    name: str
    interactions: Interactions
    user_features: pd.DataFrame | None = None
    item_features: pd.DataFrame | None = None
    user_groups: pd.Series | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    stage_samples: pd.DataFrame | None = None
    item_text: pd.Series | None = None


def _no_nan(series: pd.Series, column: str, source: str) -> None:
    isna = pd.isna(series).to_numpy()
    if isna.any():
        i = int(np.flatnonzero(isna)[0])
        raise DataError(
            f"missing or non-numeric value in row {i + 1} of the table",
            file=source,
            column=column,
            value=None if series.iloc[i] is None or series.iloc[i] != series.iloc[i] else series.iloc[i],
        )
