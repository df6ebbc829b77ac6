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


def _read(path: Path, *, sep: str, header: bool, names, encoding: str, dtype, parquet: bool):
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
        quoting=csv.QUOTE_MINIMAL,
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
) -> tuple[pd.DataFrame, np.ndarray]:
    """Read a delimited (or parquet) file into a DataFrame plus each row's line number.

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
                                 dtype=dtype, parquet=parquet)
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
