"""``atomic:DIR`` (alias ``recbole:DIR``) — RecBole's atomic files (Zhao et al., CIKM 2021).

``DIR`` holds ``NAME.inter`` (required) and optionally ``NAME.user`` and ``NAME.item``:
tab-separated text (``.gz`` too) whose first line names and types every field,
``field:type`` with type ``token`` (an id or a category), ``token_seq`` (space-separated
tokens), ``float`` or ``float_seq``, e.g. ``user_id:token  item_id:token  rating:float
timestamp:float``. ``NAME`` is the folder's own name (RecBole's layout,
``dataset/ml-100k/ml-100k.inter``), else the folder's only ``.inter`` file; with several,
choose one with ``name=NAME``. ``PATH`` may also be the ``.inter`` file itself.

Fields of ``.inter`` (RecBole's default field names; options rename them):

* ``user=user_id``, ``item=item_id`` (required);
* ``time=timestamp`` (numbers, or ISO 8601 dates read as seconds since 1970-01-01 UTC;
  without it, the row's position within its user, as RecBole's file order);
* ``rating=rating`` (kept as the rating);
* ``label=label`` (0/1 click labels). Without a label field every interaction is an
  implicit positive (RecBole's default), so next item uses every row; ``threshold=X``
  labels ``rating >= X`` instead (RecBole's ``threshold: {rating: X}``).

A default field the file lacks is simply absent; a field named by an option must exist.
Other fields are read (and type-checked) but not used.

Ids: ``ids=auto`` (default) keeps integer tokens as the raw ids (so ``atomic:`` and
``movielens:`` on MovieLens give the same ids), and codes a field with any other token
(e.g. Amazon ASINs) as integers 0, 1, ... in order of first appearance in ``.inter``
(side-file rows of ids never seen there are dropped); ``ids=int`` requires integers and
``ids=factorize`` always codes.

Side files: every ``token`` field of ``.user`` / ``.item`` other than the id becomes a
feature column of the user / item feature table, its values coded 1..K in sorted order (0 =
empty cell or no row; as ``movielens:``'s tables). ``token_seq``, ``float`` and
``float_seq`` side fields are not used as features (checked, then left out).
``features=false`` skips the side files.

Bad files are one line naming the file, the line and the field: a missing ``.inter``, a
header field without ``:type``, an unknown type, a non-numeric ``float`` value, a missing
user or item field, an empty id.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from fedrec.data.interactions import Dataset, Interactions
from fedrec.data.io import float_column, int_column, missing_cells, read_table
from fedrec.data.sources import SOURCES
from fedrec.data.sources.tabular import event_columns
from fedrec.data.spec import Options, SourceSpec
from fedrec.errors import DataError, SpecError

__all__ = ["TYPES", "read_atomic", "load_atomic"]

#: the field types of RecBole's atomic files
TYPES = ("token", "token_seq", "float", "float_seq")
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_FLOAT_SEQ = rf"(?:{_NUMBER}(?:\s+{_NUMBER})*)?"
_DEFAULTS = {"user": "user_id", "item": "item_id", "time": "timestamp", "rating": "rating", "label": "label"}


def read_atomic(path: Path) -> tuple[pd.DataFrame, np.ndarray, dict[str, str]]:
    """Read one atomic file: ``(frame, lines, types)`` with the frame's columns named by
    field (the ``:type`` suffix removed), each row's 1-based line number, and each field's
    type. Cells stay text (quotes are text, as RecBole reads them). A bad header, or a
    ``float`` / ``float_seq`` value that is not a number, is a :class:`DataError`."""
    frame, lines = read_table(path, sep="\t", header=True, dtype=str, quoting=csv.QUOTE_NONE)
    types: dict[str, str] = {}
    for column in frame.columns:
        name, sep, kind = str(column).rpartition(":")
        if not sep or not name.strip():
            raise DataError("header field has no ':type' (expected NAME:token, NAME:token_seq, NAME:float or "
                            "NAME:float_seq, tab-separated)", file=path, row=1, column=str(column))
        name, kind = name.strip(), kind.strip()
        if kind not in TYPES:
            raise DataError(f"unknown field type {kind!r} (known: {', '.join(TYPES)})", file=path, row=1, column=name)
        if name in types:
            raise DataError("field appears twice in the header", file=path, row=1, column=name)
        types[name] = kind
    frame.columns = list(types)
    for name, kind in types.items():
        filled = frame[name].notna() & (frame[name].astype("string").str.strip() != "").fillna(False)
        if kind == "float" and filled.any():  # empty cells are missing values, as in RecBole
            float_column(frame.loc[filled, [name]], name, lines[filled.to_numpy()], path)
        elif kind == "float_seq":
            ok = frame[name].astype("string").str.strip().str.fullmatch(_FLOAT_SEQ).fillna(True).to_numpy(dtype=bool)
            if not ok.all():
                i = int(np.flatnonzero(~ok)[0])
                raise DataError("expected space-separated numbers (float_seq)", file=path, row=int(lines[i]),
                                column=name, value=frame[name].iloc[i])
    return frame, lines, types


def _files(spec: SourceSpec, name: str | None) -> tuple[Path, str]:
    """``(directory, NAME)`` of the dataset the spec names (see the module docstring)."""
    path = Path(spec.path).expanduser()
    if path.is_file() or path.name.endswith((".inter", ".inter.gz")):
        if name is not None:
            raise SpecError(f"{spec.text}: option 'name' applies to a folder, not to a .inter file")
        stem = path.name[: -len(".gz")] if path.name.endswith(".gz") else path.name
        if not stem.endswith(".inter"):
            raise DataError("expected a folder or a NAME.inter file", file=path)
        if not path.is_file():
            raise DataError("file not found", file=path)
        return path.parent, stem[: -len(".inter")]
    if not path.is_dir():
        raise DataError("directory not found" if not path.exists() else "expected a folder or a NAME.inter file",
                        file=path)
    found = sorted({p.name.split(".inter")[0] for p in path.iterdir()
                    if p.is_file() and p.name.endswith((".inter", ".inter.gz"))})
    if name is not None:
        if name not in found:
            have = f" (it has: {', '.join(found)})" if found else ""
            raise DataError(f"no {name}.inter in this folder{have}", file=path)
        return path, name
    if path.name in found:
        return path, path.name
    if len(found) == 1:
        return path, found[0]
    if not found:
        raise DataError("no NAME.inter file in this folder (RecBole atomic files: NAME.inter, NAME.user, NAME.item)",
                        file=path)
    raise SpecError(f"{spec.text}: the folder holds several datasets ({', '.join(found)}); choose one with ?name=NAME")


def _file(directory: Path, name: str, suffix: str) -> Path | None:
    for candidate in (directory / f"{name}{suffix}", directory / f"{name}{suffix}.gz"):
        if candidate.is_file():
            return candidate
    return None


class _Ids:
    """Raw integer ids of one id field (user or item) across the files (see ``ids=``)."""

    def __init__(self, frame: pd.DataFrame, field: str, lines: np.ndarray, path: Path, mode: str) -> None:
        text = frame[field].astype("string").str.strip()
        integer = bool(text.str.fullmatch(r"[+-]?\d+").fillna(False).all())
        self.factorize = mode == "factorize" or (mode == "auto" and not integer)
        if self.factorize:
            codes, uniques = pd.factorize(text)
            self.values = codes.astype(np.int64)
            self.index = pd.Index(uniques)
        else:
            self.values = int_column(frame, field, lines, path)

    def side(self, frame: pd.DataFrame, field: str, lines: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, known)``: the raw id of each side-file row, and whether it is one the
        interactions know (always, for integer ids)."""
        if not self.factorize:
            ids = int_column(frame, field, lines, path)
            return ids, np.ones(len(ids), dtype=bool)
        codes = self.index.get_indexer(frame[field].astype("string").str.strip())
        return codes.astype(np.int64), codes >= 0


def _features(path: Path, id_field: str, ids: _Ids) -> pd.DataFrame:
    """The token fields of a side file as an integer-coded table indexed by raw id."""
    frame, lines, types = read_atomic(path)
    if id_field not in types:
        raise DataError(f"no '{id_field}' field (the file has: {', '.join(types)})", file=path, row=1, column=id_field)
    missing_cells(frame, id_field, lines, path)
    raw, known = ids.side(frame, id_field, lines, path)
    dup = pd.Index(raw).duplicated() & known
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise DataError("id appears twice", file=path, row=int(lines[i]), column=id_field, value=frame[id_field].iloc[i])
    out = pd.DataFrame(index=pd.Index(raw[known], name=id_field))
    for name, kind in types.items():
        if name == id_field or kind != "token":
            continue
        text = frame[name].astype("string").str.strip()[known]
        empty = (text.isna() | (text == "")).to_numpy(dtype=bool)
        codes = np.zeros(len(text), dtype=np.int64)
        if (~empty).any():
            codes[~empty] = pd.factorize(text[~empty].astype(str), sort=True)[0] + 1
        out[name] = codes
    return out


def _load(spec: SourceSpec, options: Options) -> Dataset:
    fields = {key: options.str(key) for key in _DEFAULTS}
    name = options.str("name")
    ids_mode = options.choice("ids", ("auto", "int", "factorize"), "auto")
    threshold = options.float("threshold")
    with_features = options.bool("features", True)
    options.finish()
    directory, name = _files(spec, name)
    path = _file(directory, name, ".inter")
    if path is None:  # pragma: no cover - _files found it
        raise DataError(f"no {name}.inter in this folder", file=directory)
    frame, lines, types = read_atomic(path)
    used: dict[str, str] = {}
    for key, given in fields.items():
        column = given or _DEFAULTS[key]
        if column in types:
            used[key] = column
        elif given is not None or key in ("user", "item"):
            how = f"'{key}={given}'" if given is not None else f"'{key}' (default field {column})"
            raise DataError(f"no such field for {how} (the file has: {', '.join(types)})", file=path, row=1,
                            column=column)
    if threshold is not None:
        if "rating" not in used:
            raise SpecError(f"{spec.text}: 'threshold' needs a rating field (rating=FIELD)")
        if fields["label"] is not None:
            raise SpecError(f"{spec.text}: give either 'label' or 'threshold', not both")
        used.pop("label", None)  # the threshold's label replaces a label field
    for key in ("user", "item", "time"):
        if key in used:
            missing_cells(frame, used[key], lines, path)
    users = _Ids(frame, used["user"], lines, path, ids_mode)
    items = _Ids(frame, used["item"], lines, path, ids_mode)
    table = pd.DataFrame({"user": users.values, "item": items.values})
    event_columns(table, frame, used, lines, path, threshold=threshold)
    user_features = item_features = None
    side: dict[str, str] = {}
    if with_features:
        upath, ipath = _file(directory, name, ".user"), _file(directory, name, ".item")
        if upath is not None:
            user_features = _features(upath, used["user"], users)
            side["user"] = upath.name
        if ipath is not None:
            item_features = _features(ipath, used["item"], items)
            side["item"] = ipath.name
    return Dataset(
        name=spec.text,
        interactions=Interactions.from_frame(table, source=str(path)),
        user_features=user_features if user_features is not None and user_features.shape[1] else None,
        item_features=item_features if item_features is not None and item_features.shape[1] else None,
        meta={"format": "atomic", "name": name, "fields": used, "types": types, "side_files": side,
              "ids": {"user": "factorized" if users.factorize else "int",
                      "item": "factorized" if items.factorize else "int"},
              "threshold": threshold},
    )


@SOURCES.register("atomic")
def load_atomic(spec: SourceSpec, options: Options) -> Dataset:
    """Load RecBole atomic files (options: ``name``, ``user``, ``item``, ``time``,
    ``rating``, ``label``, ``threshold``, ``ids``, ``features``)."""
    return _load(spec, options)


SOURCES.register("recbole")(load_atomic)
