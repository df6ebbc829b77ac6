"""``kuaisar:DIR`` — the KuaiSAR-R release of MRFF (AAAI 2025, Zhang et al.).

Layout (as released in the MRFF repository): ``df.csv`` with
``user_id,video_id,timestamp,is_click`` (timestamp in ms; one row per impression, the label
a real click or non-click), ``user_features.csv`` (``user_id`` + integer-coded profile
fields) and ``video_features.csv`` (``video_id`` + integer-coded attribute fields).

Feature rows are looked up **by id**: ``user_features.csv`` is not sorted by user id (the
public MRFF code reads it by row position and so gives every user someone else's profile;
we do not). Feature codes are shifted by +1 so that code 0 is free for padding.
Video id 0 is an ordinary video here; ids are remapped to 1..I (0 = padding) by the split.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedrec.data.interactions import Dataset, Interactions
from fedrec.data.io import find_in_dir, int_column, read_table, require_dir, unique_ids
from fedrec.data.sources import SOURCES
from fedrec.data.spec import Options, SourceSpec
from fedrec.errors import DataError


def read_feature_table(path, id_column: str) -> pd.DataFrame:
    """Read an integer-coded feature CSV, index it by ``id_column`` and shift codes by +1."""
    frame, lines = read_table(path, sep=",", header=True)
    if id_column not in frame.columns:
        have = ", ".join(map(str, frame.columns))
        raise DataError(f"no such column (the file has: {have})", file=path, column=id_column)
    ids = int_column(frame, id_column, lines, path)
    unique_ids(ids, lines, path, id_column)
    fields = [c for c in frame.columns if c != id_column]
    out = pd.DataFrame(index=pd.Index(ids, name=id_column))
    for col in fields:
        codes = int_column(frame, col, lines, path)
        if (codes < 0).any():
            i = int(np.flatnonzero(codes < 0)[0])
            raise DataError("feature codes must be >= 0", file=path, row=int(lines[i]), column=col, value=int(codes[i]))
        out[col] = codes + 1
    return out


@SOURCES.register("kuaisar")
def load_kuaisar(spec: SourceSpec, options: Options) -> Dataset:
    """Load the KuaiSAR-R directory layout (options: ``features=true|false``)."""
    directory = require_dir(spec.path)
    with_features = options.bool("features", True)
    options.finish()
    path = find_in_dir(directory, ["df.csv"])
    frame, lines = read_table(path, sep=",", header=True, usecols=["user_id", "video_id", "timestamp", "is_click"])
    table = pd.DataFrame(
        {
            "user": int_column(frame, "user_id", lines, path),
            "item": int_column(frame, "video_id", lines, path),
            "time": int_column(frame, "timestamp", lines, path),
            "label": int_column(frame, "is_click", lines, path),
        }
    )
    bad = ~np.isin(table["label"].to_numpy(), (0, 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError("is_click must be 0 or 1", file=path, row=int(lines[i]), column="is_click", value=int(table["label"].iloc[i]))
    interactions = Interactions.from_frame(table, source=str(path))
    user_features = item_features = None
    if with_features:
        upath = find_in_dir(directory, ["user_features.csv"], required=False)
        vpath = find_in_dir(directory, ["video_features.csv"], required=False)
        if upath is not None:
            user_features = read_feature_table(upath, "user_id")
            _check_covered(table["user"].to_numpy(), user_features.index, upath, "user_id")
        if vpath is not None:
            item_features = read_feature_table(vpath, "video_id")
            _check_covered(table["item"].to_numpy(), item_features.index, vpath, "video_id")
    return Dataset(
        name=spec.text,
        interactions=interactions,
        user_features=user_features,
        item_features=item_features,
        meta={"format": "kuaisar", "time_unit": "ms"},
    )


def _check_covered(ids: np.ndarray, index: pd.Index, path, column: str) -> None:
    missing = ~np.isin(ids, index.to_numpy())
    if missing.any():
        raise DataError(
            f"{int(np.unique(ids[missing]).size)} ids of the interactions have no feature row",
            file=path,
            column=column,
            value=int(ids[missing][0]),
        )
