"""``csv:PATH`` and ``parquet:PATH`` — a user's own logs, with a column mapping.

The query maps canonical fields to the file's columns, e.g.
``csv:logs.csv?user=uid&item=iid&time=ts&label=click``. ``user`` and ``item`` are required;
``time`` (default: the row's position within its user; numbers, or ISO 8601 dates and
date-times such as ``2024-01-02`` or ``2024-01-02T03:04:05+02:00``, read as seconds since
1970-01-01 UTC, a value without a zone taken as UTC; a parquet datetime column too),
``label`` (0/1), ``rating``,
``value`` (a regression target such as a watch time) and ``domain`` are optional; ``split`` maps a column holding train/valid/test.

CSV options: ``sep`` (default ``,``; ``tab`` or ``\\t`` for a tab, ``space`` for a space; when
a column is not found and the header line holds another common delimiter, the error says
which ``sep`` to add), ``header`` (default true; with
``header=false`` refer to columns by 0-based position, e.g. ``user=0&item=1``).
Ids must be integers unless ``ids=factorize``, which codes string ids (e.g. Amazon
reviewer ids and ASINs) as integers in order of first appearance. ``label_from_rating=X``
derives the label as ``rating >= X`` when the file has ratings but no label.

Without a mapping, a file whose columns carry the canonical names (``user``, ``item`` and
any of ``time``, ``label``, ``rating``, ``value``, ``domain``, ``split``: the client files of
``fedrec data partition``) is read as it is, e.g. ``parquet:client-0.parquet``.

``user_features=FILE`` (``.parquet`` or ``.csv``; a relative path is taken from the data
file's folder) adds a user feature table: a ``user`` column of raw ids and one column of
integer codes per field (``0`` = missing; codes are used as they are).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedrec.data.interactions import SPLITS, Dataset, Interactions
from fedrec.data.io import float_column, int_column, missing_cells, read_table, resolve_file, time_column
from fedrec.data.sources import SOURCES
from fedrec.data.spec import Options, SourceSpec
from fedrec.errors import DataError, SpecError

_FIELDS = ("user", "item", "time", "label", "rating", "value", "domain", "split")


def _load(spec: SourceSpec, options: Options, *, parquet: bool) -> Dataset:
    mapping = {f: options.str(f) for f in _FIELDS}
    user_features = options.str("user_features")
    ids = options.choice("ids", ("int", "factorize"), "int")
    threshold = options.float("label_from_rating")
    if parquet:
        header, sep = True, ","
    else:
        sep = options.str("sep", ",")
        sep = {"tab": "\t", "\\t": "\t", "space": " "}.get(sep, sep)
        header = options.bool("header", True)
    options.finish()
    canonical = all(v is None for v in mapping.values())
    if not canonical:
        for field in ("user", "item"):
            if mapping[field] is None:
                raise SpecError(f"{spec.text}: the column mapping needs '{field}=COLUMN' (e.g. ?user=uid&item=iid)")
    if threshold is not None and mapping["label"] is not None:
        raise SpecError(f"{spec.text}: give either 'label' or 'label_from_rating', not both")
    if threshold is not None and mapping["rating"] is None:
        raise SpecError(f"{spec.text}: 'label_from_rating' needs 'rating=COLUMN'")
    path = resolve_file(spec.path)
    frame, lines = read_table(path, sep=sep, header=header, parquet=parquet, dtype=None if parquet else str)
    if not header:
        frame.columns = [str(i) for i in range(frame.shape[1])]
    if canonical:
        if not {"user", "item"} <= set(map(str, frame.columns)):
            raise SpecError(f"{spec.text}: the column mapping needs 'user=COLUMN' and 'item=COLUMN' (e.g. "
                            f"?user=uid&item=iid), unless the file has columns named user and item"
                            + _delimiter_hint(frame.columns, sep, parquet))
        mapping = {f: (f if f in frame.columns else None) for f in _FIELDS}
    used = {f: c for f, c in mapping.items() if c is not None}
    for field, column in used.items():
        if column not in frame.columns:
            have = ", ".join(str(c).replace("\t", "\\t") for c in frame.columns)
            raise DataError(f"no such column for '{field}' (the file has: {have})"
                            + _delimiter_hint(frame.columns, sep, parquet), file=path, column=column)
    for field in ("user", "item", "domain", "split"):
        if field in used:
            missing_cells(frame, used[field], lines, path)
    if "split" in used:
        bad = ~frame[used["split"]].astype(str).str.strip().isin(SPLITS).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError("split must be train, valid or test", file=path, row=int(lines[i]),
                            column=used["split"], value=frame[used["split"]].iloc[i])
    table = pd.DataFrame(index=pd.RangeIndex(len(frame)))
    for field in ("user", "item"):
        column = used[field]
        if ids == "factorize":
            codes, _ = pd.factorize(frame[column].astype(str).str.strip())
            table[field] = codes.astype(np.int64)
        else:
            table[field] = int_column(frame, column, lines, path)
    event_columns(table, frame, used, lines, path, threshold=threshold)
    for field in ("domain", "split"):
        if field in used:
            table[field] = frame[used[field]].astype(str).str.strip().to_numpy()
    fmt = "parquet" if parquet else "csv"
    users = _user_features(user_features, path) if user_features else None
    return Dataset(spec.text, Interactions.from_frame(table, source=str(path)), user_features=users,
                   meta={"format": fmt, "columns": used})


def event_columns(table: pd.DataFrame, frame: pd.DataFrame, used: dict[str, str], lines: np.ndarray, path,
                  *, threshold: float | None = None) -> None:
    """Fill ``table`` (which holds ``user`` and ``item``) with the canonical ``time``,
    ``rating``, ``value`` and ``label`` columns read from ``frame``'s columns named in
    ``used`` (the tabular and RecBole atomic sources share this): ``time`` numbers or ISO
    8601 dates (seconds since the epoch, UTC), else each user's row order; ``label`` 0/1
    (a one-line :class:`DataError` naming the first other value), else ``rating >=
    threshold`` when a threshold is given."""
    if "time" in used:
        table["time"] = time_column(frame, used["time"], lines, path)
    else:
        table["time"] = table.groupby("user").cumcount().to_numpy()
    for field in ("rating", "value"):
        if field in used:
            table[field] = float_column(frame, used[field], lines, path)
    if "label" in used:
        label = float_column(frame, used["label"], lines, path)
        bad = ~np.isin(label, (0.0, 1.0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError("label must be 0 or 1", file=path, row=int(lines[i]), column=used["label"],
                            value=frame[used["label"]].iloc[i])
        table["label"] = label.astype(np.int8)
    elif threshold is not None:
        table["label"] = (table["rating"].to_numpy() >= threshold).astype(np.int8)


#: delimiters a header line may hold when ``sep`` is not given: (character, its spelling in a spec)
_DELIMITERS = (("\t", "tab"), (";", ";"), ("|", "|"), (" ", "space"))


def _delimiter_hint(columns, sep: str, parquet: bool) -> str:
    """``"; the header line holds tabs: add sep=tab to the spec"`` when the columns read
    with ``sep`` hold another common delimiter (a space only when the whole header came out
    as one column: column names may contain spaces); ``""`` otherwise."""
    if parquet:
        return ""
    names = [str(c) for c in columns]
    for char, spelled in _DELIMITERS:
        if char != sep and any(char in name for name in names) and (char != " " or len(names) == 1):
            what = {"\t": "tabs", " ": "spaces"}.get(char, f"'{char}'")
            return f"; the header line holds {what}: add sep={spelled} to the spec"
    return ""


def _user_features(name: str, data_path) -> pd.DataFrame:
    """A user feature table (``user`` + integer code columns), indexed by raw user id."""
    from pathlib import Path

    path = Path(name)
    if not path.is_absolute():
        path = Path(data_path).parent / path
    path = resolve_file(path)
    parquet = path.suffix == ".parquet"
    frame, lines = read_table(path, sep=",", header=True, parquet=parquet, dtype=None if parquet else str)
    if "user" not in frame.columns:
        raise DataError(f"no 'user' column (the file has: {', '.join(map(str, frame.columns))})", file=path,
                        column="user")
    missing_cells(frame, "user", lines, path)
    out = pd.DataFrame(index=pd.Index(int_column(frame, "user", lines, path), name="user"))
    if out.index.has_duplicates:
        dup = out.index[out.index.duplicated()][0]
        raise DataError("user appears more than once", file=path, column="user", value=int(dup))
    for col in frame.columns:
        if col == "user":
            continue
        codes = int_column(frame[[col]].fillna(0), col, lines, path)  # an empty cell: code 0 (missing)
        if (codes < 0).any():
            i = int(np.flatnonzero(codes < 0)[0])
            raise DataError("feature codes must be >= 0", file=path, row=int(lines[i]), column=str(col),
                            value=int(codes[i]))
        out[str(col)] = codes
    return out


@SOURCES.register("csv")
def load_csv(spec: SourceSpec, options: Options) -> Dataset:
    """Load a delimited file with a column mapping in the spec's query."""
    return _load(spec, options, parquet=False)


@SOURCES.register("parquet")
def load_parquet(spec: SourceSpec, options: Options) -> Dataset:
    """Load a parquet file with a column mapping in the spec's query."""
    return _load(spec, options, parquet=True)
