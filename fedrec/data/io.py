"""File helpers shared by the sources: ``.gz`` transparency and errors that name the line.

Every reader here turns pandas/OS failures into :class:`~fedrec.errors.DataError` with
the file, the 1-based line and the column, so a source never leaks a deep traceback.
"""

from __future__ import annotations

import csv
import gzip
import io
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from fedrec.errors import DataError

__all__ = [
    "resolve_file",
    "find_in_dir",
    "open_text",
    "read_table",
    "int_column",
    "float_column",
    "iter_lines",
    "unique_ids",
    "missing_cells",
    "time_column",
]


def resolve_file(path: str | Path) -> Path:
    """Return ``path`` if it is a file, else ``path.gz`` if that is; raise otherwise."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    gz = p.with_name(p.name + ".gz")
    if gz.is_file():
        return gz
    if p.is_dir():
        raise DataError("is a directory, expected a file", file=p)
    raise DataError("file not found", file=p)


def find_in_dir(directory: Path, names: Sequence[str], *, required: bool = True) -> Path | None:
    """First of ``names`` (or ``name.gz``) present in ``directory``."""
    for name in names:
        for candidate in (directory / name, directory / (name + ".gz")):
            if candidate.is_file():
                return candidate
    if required:
        raise DataError(f"expected one of {', '.join(names)} in this directory", file=directory)
    return None


def require_dir(path: str | Path) -> Path:
    """Return ``path`` as a directory or raise a :class:`DataError`."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise DataError("is a file, expected a directory", file=p)
    raise DataError("directory not found", file=p)


def open_text(path: Path, encoding: str = "utf-8"):
    """Open a text file, decompressing ``.gz`` transparently."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, newline="")
    return open(path, encoding=encoding, newline="")


def iter_lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, stripped_line)`` for non-blank lines (1-based numbers)."""
    try:
        with open_text(path, encoding) as handle:
            for number, line in enumerate(handle, start=1):
                line = line.strip()
                if line:
                    yield number, line
    except UnicodeDecodeError as exc:
        raise DataError(f"not {encoding} text ({exc.reason})", file=path) from None
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read file ({exc})", file=path) from None


def _read(path: Path, *, sep: str, header: bool, names, encoding: str, dtype, parquet: bool,
          quoting: int = csv.QUOTE_MINIMAL):
    if parquet:
        frame = pd.read_parquet(path)
        return frame, np.arange(len(frame)) + 1
    frame = pd.read_csv(
        path,
        sep=sep,
        header=0 if header else None,
        names=None if header else list(names) if names is not None else None,
        engine="c" if len(sep) == 1 or sep == r"\s+" else "python",
        skip_blank_lines=False,
        encoding=encoding,
        compression="infer",
        dtype=dtype,
        quoting=quoting,
        index_col=False,
    )
    return frame, np.arange(len(frame)) + (2 if header else 1)


def read_table(
    path: Path,
    *,
    sep: str,
    header: bool,
    names: Sequence[str] | None = None,
    usecols: Sequence[str] | None = None,
    encoding: str = "utf-8",
    dtype: object | None = None,
    parquet: bool = False,
    quoting: int = csv.QUOTE_MINIMAL,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Read a delimited (or parquet) file into a DataFrame plus each row's line number.

    ``quoting`` is :mod:`csv`'s (``csv.QUOTE_NONE`` reads quote characters as text, as
    RecBole reads its atomic files).

    Blank lines are dropped; the returned ``lines`` array gives, per remaining row, its
    1-based line number in the file (header included), for error messages.
    Raises :class:`DataError` for a missing, empty, undecodable or malformed file, and for
    a requested column the file does not have.
    """
    try:
        with warnings.catch_warnings():
            # pandas only warns when line 1 has more fields than the names: make it an error
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame, lines = _read(path, sep=sep, header=header, names=names, encoding=encoding,
                                 dtype=dtype, parquet=parquet, quoting=quoting)
    except pd.errors.ParserWarning:
        expected = len(names) if names is not None else "header's"
        raise DataError(f"line {2 if header else 1} has more fields than the {expected} expected", file=path) from None
    except FileNotFoundError:
        raise DataError("file not found", file=path) from None
    except pd.errors.EmptyDataError:
        raise DataError("file is empty", file=path) from None
    except pd.errors.ParserError as exc:
        raise DataError(f"malformed file: {str(exc).strip().splitlines()[-1]}", file=path) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"not {encoding} text ({exc.reason})", file=path) from None
    except (OSError, EOFError, gzip.BadGzipFile, ValueError, ImportError) as exc:
        raise DataError(f"cannot read file ({str(exc).strip().splitlines()[0]})", file=path) from None
    if header:
        frame.columns = [str(c).strip() for c in frame.columns]
    if usecols is not None:
        for col in usecols:
            if col not in frame.columns:
                have = ", ".join(map(str, frame.columns))
                raise DataError(f"no such column (the file has: {have})", file=path, column=col)
        frame = frame[list(usecols)]
    blank = frame.isna().all(axis=1).to_numpy()
    if blank.any():
        frame = frame.loc[~blank].reset_index(drop=True)
        lines = lines[~blank]
    if len(frame) == 0:
        raise DataError("file has no data rows", file=path)
    return frame, lines


def _first_bad(bad: np.ndarray, series: pd.Series, lines: np.ndarray, path: Path, column: str, what: str):
    i = int(np.flatnonzero(bad)[0])
    value = series.iloc[i]
    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise DataError(f"missing value, expected {what}", file=path, row=int(lines[i]), column=column)
    raise DataError(f"expected {what}", file=path, row=int(lines[i]), column=column, value=value)


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_EXACT_FLOAT = 2**53  # integers beyond this are not exact in float64


def int_column(frame: pd.DataFrame, column: str, lines: np.ndarray, path: Path) -> np.ndarray:
    """Column ``column`` as int64, or a :class:`DataError` naming the first bad line and value.

    Integer text is parsed exactly (no detour through float64, so large ids are never
    rounded); ids outside the int64 range are errors. Integral floats such as ``"3.0"`` are
    accepted when they are exact in float64.
    """
    series = frame[column]
    if pd.api.types.is_integer_dtype(series.dtype):
        return series.to_numpy(dtype=np.int64)
    if pd.api.types.is_bool_dtype(series.dtype):
        return series.to_numpy(dtype=np.int64)
    if pd.api.types.is_float_dtype(series.dtype):
        values = series.to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values) | (values != np.round(values)) | (np.abs(values) > _EXACT_FLOAT)
        if bad.any():
            _first_bad(bad, series, lines, path, column, "an integer")
        return values.astype(np.int64)
    text = series.astype("string").str.strip()
    is_int = text.str.fullmatch(r"[+-]?\d+").fillna(False).to_numpy(dtype=bool)
    if is_int.all():
        as_int = [int(v) for v in text]
        out_of_range = np.array([not (_INT64_MIN <= v <= _INT64_MAX) for v in as_int])
        if out_of_range.any():
            _first_bad(out_of_range, series, lines, path, column, "an integer id within the int64 range")
        return np.array(as_int, dtype=np.int64)
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~is_int & (~np.isfinite(values) | (values != np.round(values)) | (np.abs(values) > _EXACT_FLOAT))
    if bad.any():
        _first_bad(bad, series, lines, path, column, "an integer")
    # mixed integer text and integral floats: parse each exactly
    return np.array([int(v) if ok else int(f) for v, ok, f in zip(text, is_int, values)], dtype=np.int64)


def unique_ids(ids: np.ndarray, lines: np.ndarray, path: Path, column: str) -> None:
    """Raise a :class:`DataError` naming the first repeated id of a feature table."""
    dup = pd.Index(ids).duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise DataError("duplicate id", file=path, row=int(lines[i]), column=column, value=int(ids[i]))


def missing_cells(frame: pd.DataFrame, column: str, lines: np.ndarray, path: Path) -> None:
    """Raise a :class:`DataError` naming the first empty cell of ``column``."""
    series = frame[column]
    empty = series.isna().to_numpy() | (series.astype("string").str.strip() == "").fillna(True).to_numpy(dtype=bool)
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise DataError("missing value", file=path, row=int(lines[i]), column=column)


def float_column(frame: pd.DataFrame, column: str, lines: np.ndarray, path: Path) -> np.ndarray:
    """Column ``column`` as float64, or a :class:`DataError` naming the first bad line and value."""
    series = frame[column]
    numeric = pd.to_numeric(series, errors="coerce")
    values = numeric.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        _first_bad(bad, series, lines, path, column, "a number")
    return values


_ISO_8601 = (r"\d{4}-\d{2}-\d{2}"  # a date
             r"(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?)?"  # an optional time
             r"(?:Z|[+-]\d{2}(?::?\d{2})?)?")  # an optional zone
_EPOCH = pd.Timestamp(0, tz="UTC")


def time_column(frame: pd.DataFrame, column: str, lines: np.ndarray, path: Path) -> np.ndarray:
    """Column ``column`` as times: numbers as they are (int64 when every value is whole),
    or ISO 8601 dates / date-times (``2024-01-02``, ``2024-01-02T03:04:05``, ``... 03:04``,
    fractional seconds, a ``Z`` or ``+02:00`` zone) as seconds since 1970-01-01 UTC, a value
    without a zone read as UTC. A parquet datetime column is converted the same way.

    The first value decides which: a number first means every value must be a number, a
    date first means every value must be a date. Anything else (a missing value, a value of
    neither kind, an impossible date) is a :class:`DataError` naming the file, the line,
    the column and the first bad value.
    """
    series = frame[column]
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        stamps = series.dt.tz_localize("UTC") if series.dt.tz is None else series.dt.tz_convert("UTC")
        bad = stamps.isna().to_numpy()
        if bad.any():
            _first_bad(bad, series, lines, path, column, "a date/time")
        return _seconds(stamps)
    if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
        return _whole(float_column(frame, column, lines, path))
    text = series.astype("string").str.strip()
    first = text.iloc[0] if len(text) else None
    if first is None or first is pd.NA or not str(first) or pd.notna(pd.to_numeric(pd.Series([first]), errors="coerce")[0]):
        return _whole(float_column(frame, column, lines, path))
    iso = text.str.fullmatch(_ISO_8601).fillna(False).to_numpy(dtype=bool)
    stamps = pd.Series(pd.NaT, index=series.index, dtype="datetime64[us, UTC]")
    if iso.any():
        stamps[iso] = pd.to_datetime(text[iso].str.replace(",", ".", regex=False), utc=True, format="ISO8601",
                                     errors="coerce")
    bad = stamps.isna().to_numpy()
    if bad.any():
        what = ("a number or an ISO 8601 date/time" if bad[0] else
                "an ISO 8601 date/time, as the column's first value") + " (e.g. 2024-01-02 or 2024-01-02T03:04:05Z)"
        _first_bad(bad, series, lines, path, column, what)
    return _seconds(stamps)


def _seconds(stamps: pd.Series) -> np.ndarray:
    """Seconds since the epoch of UTC timestamps (int64 when all are whole seconds)."""
    return _whole(((stamps - _EPOCH) / pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64))


def _whole(values: np.ndarray) -> np.ndarray:
    """``values`` as int64 when every one is a whole number (exactly), else unchanged."""
    if np.all(values == np.round(values)) and np.all(np.abs(values) <= _EXACT_FLOAT):
        return values.astype(np.int64)
    return values
