"""``movielens:PATH`` — MovieLens ratings (Harper & Konstan, ACM TiiS 2015).

``PATH`` is a ratings file or the directory holding it:

* MovieLens-100K ``u.data``: tab-separated ``user item rating unix_time``;
* MovieLens-1M / 10M ``ratings.dat``: ``user::item::rating::unix_time``.

Every rating is a real exposure, so the ``label`` is ``rating >= threshold`` (option
``threshold``, default 4) and the rating is kept in ``rating``. Next item then uses the
positives only: a user's ratings below the threshold are neither history nor targets, and a
user whose held-out (last) rating is below it is **not evaluated** at that stage (on
MovieLens-100K, 486 of 943 users at test). Option ``implicit=true`` (or ``threshold=0``,
which labels every rating positive) makes every rating an interaction, as in the
federated-recommendation protocol (all ratings as implicit positives, every user evaluated
on its last interaction); ``implicit=true`` writes no label column (a CTR task then has
nothing to predict) and excludes ``threshold``. When the user and item
files sit beside the ratings (``u.user``/``u.item`` or ``users.dat``/``movies.dat``), they
become integer-coded feature tables (code 0 = padding/unknown):

* users: ``age`` (the MovieLens-1M age bands), ``gender``, ``occupation``, ``zip1`` (first
  zip digit);
* items: ``genre1``, ``genre2`` (first two listed genres, 0 if absent), ``decade``; and the
  item's text, ``"<title>. <genre>, <genre>, ..."`` (:attr:`Dataset.item_text`, what QARM's
  content encoder reads).

Option ``features=false`` skips them.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from fedrec.data.interactions import Dataset, Interactions
from fedrec.data.io import find_in_dir, float_column, int_column, read_table, resolve_file, unique_ids
from fedrec.data.sources import SOURCES
from fedrec.data.spec import Options, SourceSpec
from fedrec.errors import DataError, SpecError

_AGE_BANDS = np.array([18, 25, 35, 45, 50, 56])  # MovieLens-1M bands: 1, 18, 25, 35, 45, 50, 56
_YEAR = re.compile(r"\((\d{4})\)\s*$")
_DATE_YEAR = re.compile(r"(\d{4})\s*$")


def _ratings_path(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        return find_in_dir(p, ["u.data", "ratings.dat"])  # type: ignore[return-value]
    return resolve_file(p)


def _codes(values: pd.Series) -> np.ndarray:
    """Dense integer codes 1..K for categorical values (0 reserved for unknown)."""
    codes, _ = pd.factorize(values.astype(str), sort=True)
    return codes.astype(np.int64) + 1


def _user_features(path: Path, dat: bool) -> pd.DataFrame:
    # u.user: id|age|gender|occupation|zip ; users.dat: id::gender::age::occupation::zip
    names = ["user", "gender", "age", "occupation", "zip"] if dat else ["user", "age", "gender", "occupation", "zip"]
    frame, lines = read_table(path, sep="::" if dat else "|", header=False, dtype=str, names=names,
                              encoding="latin-1")
    ids = int_column(frame, "user", lines, path)
    unique_ids(ids, lines, path, "user")
    age = int_column(frame, "age", lines, path)
    out = pd.DataFrame(index=pd.Index(ids, name="user"))
    out["age"] = np.searchsorted(_AGE_BANDS, age, side="right") + 1
    out["gender"] = _codes(frame["gender"])
    out["occupation"] = _codes(frame["occupation"])
    out["zip1"] = _codes(frame["zip"].astype(str).str[:1])
    return out


#: MovieLens-100K's genre flags, in u.item's column order (u.genre)
GENRES_100K = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
               "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
               "Western")


def _item_text(ids: np.ndarray, titles: pd.Series, genres: list[str]) -> pd.Series:
    """``"<title>. <genre>, <genre>"`` per item id (the content a text encoder reads)."""
    text = [f"{str(t).strip()}. {', '.join(g)}" if g else str(t).strip() for t, g in zip(titles.fillna(""), genres)]
    return pd.Series(text, index=pd.Index(ids, name="item"), name="text")


def _item_features_100k(path: Path) -> pd.DataFrame:
    genre_cols = [f"g{i}" for i in range(19)]
    frame, lines = read_table(path, sep="|", header=False, dtype=str, encoding="latin-1",
                              names=["item", "title", "release", "video", "url", *genre_cols])
    ids = int_column(frame, "item", lines, path)
    unique_ids(ids, lines, path, "item")
    flags = frame[genre_cols].fillna("0").to_numpy() == "1"
    years = frame["release"].fillna("").str.extract(_DATE_YEAR)[0]
    genres = [[GENRES_100K[j] for j in np.flatnonzero(row)] for row in flags]
    return _item_table(ids, flags, years), _item_text(ids, frame["title"], genres)


def _item_features_dat(path: Path) -> pd.DataFrame:
    frame, lines = read_table(path, sep="::", header=False, dtype=str, encoding="latin-1",
                              names=["item", "title", "genres"])
    ids = int_column(frame, "item", lines, path)
    unique_ids(ids, lines, path, "item")
    flags = frame["genres"].fillna("").str.get_dummies(sep="|").to_numpy().astype(bool)
    years = frame["title"].fillna("").str.extract(_YEAR)[0]
    genres = [[g for g in str(v).split("|") if g] for v in frame["genres"].fillna("")]
    return _item_table(ids, flags, years), _item_text(ids, frame["title"], genres)


def _item_table(ids: np.ndarray, flags: np.ndarray, years: pd.Series) -> pd.DataFrame:
    out = pd.DataFrame(index=pd.Index(ids, name="item"))
    # first and second set flag; 0 when absent
    order = np.argsort(~flags, axis=1, kind="stable")
    count = flags.sum(axis=1)
    out["genre1"] = np.where(count > 0, order[:, 0] + 1, 0)
    second = order[:, 1] + 1 if flags.shape[1] > 1 else np.zeros(len(ids), dtype=np.int64)
    out["genre2"] = np.where(count > 1, second, 0)
    decade = pd.to_numeric(years, errors="coerce") // 10
    codes = np.zeros(len(ids), dtype=np.int64)  # 0 = unknown year
    known = decade.notna().to_numpy()
    codes[known] = _codes(decade[known].astype(int))
    out["decade"] = codes
    return out


@SOURCES.register("movielens")
def load_movielens(spec: SourceSpec, options: Options) -> Dataset:
    """Load MovieLens ratings (options: ``threshold`` (default 4), ``implicit``, ``features``)."""
    implicit = options.bool("implicit", False)
    if implicit and options.has("threshold"):
        raise SpecError(f"{spec.text}: options 'implicit' and 'threshold' exclude each other "
                        "(implicit=true makes every rating a positive)")
    threshold = options.float("threshold", 4.0)
    with_features = options.bool("features", True)
    options.finish()
    path = _ratings_path(spec.path)
    dat = path.name.startswith("ratings.dat") or _sniff_double_colon(path)
    sep = "::" if dat else "\t"
    frame, lines = read_table(path, sep=sep, header=False, names=["user", "item", "rating", "time"])
    rating = float_column(frame, "rating", lines, path)
    table = pd.DataFrame(
        {
            "user": int_column(frame, "user", lines, path),
            "item": int_column(frame, "item", lines, path),
            "time": int_column(frame, "time", lines, path),
            "label": (rating >= threshold).astype(np.int8),
            "rating": rating,
        }
    )
    if implicit:  # every rating an implicit positive: no label column
        table = table.drop(columns="label")
    interactions = Interactions.from_frame(table, source=str(path))
    user_features = item_features = item_text = None
    if with_features:
        directory = path.parent
        upath = find_in_dir(directory, ["users.dat" if dat else "u.user"], required=False)
        ipath = find_in_dir(directory, ["movies.dat" if dat else "u.item"], required=False)
        if upath is not None:
            user_features = _user_features(upath, dat)
        if ipath is not None:
            item_features, item_text = _item_features_dat(ipath) if dat else _item_features_100k(ipath)
    return Dataset(
        name=spec.text,
        interactions=interactions,
        user_features=user_features,
        item_features=item_features,
        item_text=item_text,
        meta={"format": "movielens", "threshold": None if implicit else threshold, "implicit": implicit,
              "time_unit": "s"},
    )


def _sniff_double_colon(path: Path) -> bool:
    from fedrec.data.io import iter_lines

    for _, line in iter_lines(path, encoding="latin-1"):
        return "::" in line
    raise DataError("file is empty", file=path)
