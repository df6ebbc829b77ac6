"""``recflow:DIR`` — RecFlow, exposures and every funnel stage's filtered candidates.

RecFlow: "An Industrial Full Flow Recommendation Dataset", Liu et al., ICLR 2025,
arXiv:2410.20868; ``synthetic:kind=recflow,...`` is a funnel generator with its columns.

RecFlow logs every stage of Kuaishou's recommendation funnel for 42K users over 37 days: the
exposures (``realshow``) and, per request, the items each stage filtered out. The data is a
manual download (no sample ships with its repository; none is in ``../shared/data``); the
layout read here is the published one (``RecFlow-ICLR/RecFlow``):

``DIR/realshow/<day>.feather``
    one row per exposed video: ``request_id, request_timestamp, user_id, video_id``, the user
    profile ``age, gender, province``, the item attributes ``category_level_one,
    category_level_two, upload_type``, ``duration`` (ms), ``playing_time`` (ms) and the
    feedback ``effective_view`` (watched >= 30 %), ``long_view``, ``like``, ``follow``,
    ``forward``, ``comment``.
``DIR/all_stage/<day>.feather`` (optional)
    one row per (request, candidate video) that reached any stage, with the stage flags
    ``realshow, rerank_pos, rerank_neg, rank_pos, rank_neg, coarse_neg, prerank_neg``
    (0/1) and the same user / item columns.

Days are read in file-name order (``.feather`` or ``.parquet``). Mapped to the canonical
table: ``user`` = ``user_id``, ``item`` = ``video_id``, ``time`` = ``request_timestamp``,
``label`` = the feedback column of option ``label`` (``effective_view``, RecFlow's positive),
``value`` = ``playing_time`` (CRM's condition). User features: ``age, gender, province``;
item features: ``category_level_one, category_level_two, upload_type`` (codes as they are,
shifted by +1 so that 0 is padding; no factorising, so every node codes them alike). The
stage rows that were not exposed become :attr:`~fedrec.data.interactions.Dataset.stage_samples`
(``user, item, time, stage``): the request's filtered candidates, ``stage`` the RecFlow
priority of the deepest stage the item reached (``rerank`` 4: passed ranking, cut at
re-ranking; ``rank`` 3; ``coarse`` 2; ``prerank`` 1). ``fedrec train --set
stage-negatives=N`` draws N of each positive's training negatives from its own request's
stage samples (RecFlow's hard-negative baseline).

Options: ``label`` (``effective_view``; or ``long_view``, ``like``, ``follow``, ``forward``,
``comment``), ``days`` (read only the first N day files; default all), ``stages`` (true:
read ``all_stage`` when present).

The generator (``synthetic:kind=recflow``, :func:`generate_recflow`) simulates the funnel
with these columns: users with a taste ``w_u`` (``groups`` latent groups as in
``synthetic:``), items with a vector, a category pair, an author, a duration and a Zipf
popularity. Each request draws ``candidates`` (60) items by popularity; the *system* scores
them by ``w_u . v_i / sqrt(dim)`` plus ``N(0, system_noise^2)`` noise and keeps the top 30
(pre-ranking), 15 (coarse), 6 (ranking) and 3 (re-ranking: exposed). The watched fraction
is ``sigmoid(sharpness * (w_u . v_i / sqrt(dim) - watch_offset) + b_u + N(0, 0.5^2))``
(``b_u ~ N(0, 0.5^2)``; with the defaults 64 % of exposures are effective views), ``playing_time`` =
fraction x ``duration``, ``effective_view`` = fraction >= 0.3, ``long_view`` = fraction >= 0.95,
``like`` a Bernoulli(0.2) of effective views. Options (defaults): ``users=300, items=500,
requests=20, candidates=60, groups=4, dim=16, group_weight=0.8, sharpness=3.0,
system_noise=1.0, watch_offset=1.5, seed=0``. :func:`write_recflow` writes it as a RecFlow folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedrec.data.interactions import Dataset, Interactions
from fedrec.data.io import require_dir
from fedrec.data.sources import SOURCES
from fedrec.data.spec import Options, SourceSpec
from fedrec.errors import DataError, SpecError

__all__ = ["FEEDBACK", "STAGES", "USER_FIELDS", "ITEM_FIELDS", "generate_recflow", "recflow_dataset", "write_recflow"]

FEEDBACK = ("effective_view", "long_view", "like", "follow", "forward", "comment")
#: stage flag -> RecFlow's priority (FSLTR: click 6 > realshow 5 > rank/rerank_pos 4 >
#: rank/rerank_neg 3 > coarse_neg 2 > prerank_neg 1), for the samples that were not exposed
STAGES = {"rerank_neg": 4, "rank_neg": 3, "coarse_neg": 2, "prerank_neg": 1}
STAGE_NAMES = {4: "rerank", 3: "rank", 2: "coarse", 1: "prerank"}
USER_FIELDS = ("age", "gender", "province")
ITEM_FIELDS = ("category_level_one", "category_level_two", "upload_type")
_ID = ("request_id", "request_timestamp", "user_id", "video_id")
_REALSHOW = _ID + USER_FIELDS + ITEM_FIELDS + ("duration", "playing_time") + FEEDBACK
_ALL_STAGE = _ID + ("realshow", "rerank_pos", "rank_pos") + tuple(STAGES) + USER_FIELDS + ITEM_FIELDS


def _day_files(folder: Path, days: int | None) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix in (".feather", ".parquet"))
    if not files:
        raise DataError("no .feather or .parquet day files", file=folder)
    return files[:days] if days else files


def _read_days(folder: Path, days: int | None, columns: tuple[str, ...]) -> pd.DataFrame:
    frames = []
    for path in _day_files(folder, days):
        try:
            frame = pd.read_feather(path) if path.suffix == ".feather" else pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types on a corrupt file
            raise DataError(f"cannot read the file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                            file=path) from None
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise DataError(f"missing RecFlow column (the file has: {', '.join(map(str, frame.columns))})",
                            file=path, column=missing[0])
        bad = [c for c in columns if not pd.api.types.is_numeric_dtype(frame[c])]
        if bad:
            raise DataError("RecFlow columns must be numeric", file=path, column=bad[0])
        nan = [c for c in columns if frame[c].isna().any()]
        if nan:
            row = int(np.flatnonzero(frame[nan[0]].isna().to_numpy())[0])
            raise DataError(f"missing value in row {row + 1}", file=path, column=nan[0])
        frames.append(frame[list(columns)])
    return pd.concat(frames, ignore_index=True)


def _codes(frame: pd.DataFrame, key: str, fields: tuple[str, ...], source: str) -> pd.DataFrame:
    """One row per id (its first row), the fields' codes shifted by +1 (0 = padding)."""
    table = frame.drop_duplicates(key)[[key, *fields]].set_index(key)
    for col in fields:
        if (table[col] < 0).any():
            raise DataError("feature codes must be >= 0", file=source, column=col, value=int(table[col].min()))
    table = table.astype(np.int64) + 1
    table.index = table.index.astype(np.int64)
    table.index.name = "user" if key == "user_id" else "item"
    return table


def recflow_dataset(realshow: pd.DataFrame, all_stage: pd.DataFrame | None, *, name: str, label: str = "effective_view",
                    source: str = "") -> Dataset:
    """The canonical :class:`Dataset` of RecFlow tables (module docstring)."""
    if label not in FEEDBACK:
        raise SpecError(f"{name}: option 'label' must be one of {', '.join(FEEDBACK)} (got {label!r})")
    flags = realshow[label].to_numpy()
    if not np.isin(flags, (0, 1)).all():
        bad = flags[~np.isin(flags, (0, 1))][0]
        raise DataError("feedback must be 0 or 1", file=source or name, column=label, value=bad)
    table = pd.DataFrame({
        "user": realshow["user_id"].to_numpy(np.int64),
        "item": realshow["video_id"].to_numpy(np.int64),
        "time": realshow["request_timestamp"].to_numpy(np.int64),
        "label": flags.astype(np.int8),
        "value": realshow["playing_time"].to_numpy(np.float64),
    })
    frames = [realshow] + ([all_stage] if all_stage is not None else [])
    items = pd.concat([f[["video_id", *ITEM_FIELDS]] for f in frames], ignore_index=True)
    stage_samples = None
    if all_stage is not None:
        hidden = all_stage[all_stage["realshow"] == 0]
        priority = np.zeros(len(hidden), dtype=np.int8)
        for flag, p in STAGES.items():  # the deepest stage reached wins
            priority = np.maximum(priority, np.where(hidden[flag].to_numpy() == 1, p, 0).astype(np.int8))
        keep = priority > 0
        stage_samples = pd.DataFrame({
            "user": hidden["user_id"].to_numpy(np.int64)[keep],
            "item": hidden["video_id"].to_numpy(np.int64)[keep],
            "time": hidden["request_timestamp"].to_numpy(np.int64)[keep],
            "stage": priority[keep],
        })
    return Dataset(
        name=name,
        interactions=Interactions.from_frame(table, source=source or name),
        user_features=_codes(realshow, "user_id", USER_FIELDS, source or name),
        item_features=_codes(items, "video_id", ITEM_FIELDS, source or name),
        stage_samples=stage_samples,
        meta={"format": "recflow", "time_unit": "ms", "label": label,
              "stage_samples": 0 if stage_samples is None else int(len(stage_samples))},
    )


@SOURCES.register("recflow")
def load_recflow(spec: SourceSpec, options: Options) -> Dataset:
    """Load a RecFlow folder (options ``label``, ``days``, ``stages``; module docstring)."""
    label = options.choice("label", FEEDBACK, "effective_view")
    days = options.int("days", None, minimum=1)
    stages = options.bool("stages", True)
    options.finish()
    root = require_dir(spec.path)
    realshow_dir = root / "realshow"
    if not realshow_dir.is_dir():
        raise DataError("not a RecFlow folder: it has no realshow/ folder of day files", file=root)
    realshow = _read_days(realshow_dir, days, _REALSHOW)
    all_stage = None
    if stages and (root / "all_stage").is_dir():
        all_stage = _read_days(root / "all_stage", days, _ALL_STAGE)
    return recflow_dataset(realshow, all_stage, name=spec.text, label=label, source=str(realshow_dir))


def generate_recflow(*, users: int = 300, items: int = 500, requests: int = 20, candidates: int = 60, groups: int = 4,
                     dim: int = 16, group_weight: float = 0.8, sharpness: float = 3.0, system_noise: float = 1.0,
                     watch_offset: float = 1.5, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(realshow, all_stage)`` frames of a simulated funnel with RecFlow's columns
    (module docstring). Each request is one day-independent timestamp; ``request_timestamp``
    is in ms."""
    keep = (30, 15, 6, 3)  # after pre-ranking, coarse ranking, ranking, re-ranking
    if candidates < keep[0] + 1:
        raise SpecError(f"synthetic:kind=recflow: candidates must be > {keep[0]} (got {candidates})")
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((groups, dim))
    group = rng.integers(groups, size=users)
    taste = np.sqrt(group_weight) * theta[group] + np.sqrt(1 - group_weight) * rng.standard_normal((users, dim))
    bias = 0.5 * rng.standard_normal(users)
    profile = {"age": rng.integers(7, size=users), "gender": rng.integers(2, size=users),
               "province": rng.integers(30, size=users)}
    cat2 = rng.integers(40, size=items)
    cat1 = cat2 // 4
    vec = rng.standard_normal((40, dim))[cat2] + 0.6 * rng.standard_normal((items, dim))
    item_cols = {"category_level_one": cat1, "category_level_two": cat2, "upload_type": rng.integers(3, size=items)}
    duration = np.exp(rng.normal(np.log(30_000), 0.6, size=items)).round()
    pop = 1.0 / (rng.permutation(items) + 1.0) ** 0.8
    pop /= pop.sum()

    n_req = users * requests
    req_user = np.repeat(np.arange(users), requests)
    gaps = rng.exponential(3_600_000, size=n_req).round().astype(np.int64) + 1
    start = 1_705_100_000_000 + rng.integers(0, 86_400_000, size=users)
    cum = gaps.reshape(users, requests).cumsum(axis=1)
    req_time = (start[:, None] + cum).reshape(-1)
    cand = np.stack([rng.choice(items, size=candidates, replace=False, p=pop) for _ in range(n_req)])
    affinity = np.einsum("rd,rkd->rk", taste[req_user], vec[cand]) / np.sqrt(dim)
    system = affinity + system_noise * rng.standard_normal(affinity.shape)
    order = np.argsort(-system, axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(candidates)[None, :], axis=1)
    shown = rank < keep[3]
    flags = {
        "realshow": shown,
        "rerank_pos": shown,
        "rerank_neg": (rank >= keep[3]) & (rank < keep[2]),
        "rank_pos": rank < keep[2],
        "rank_neg": (rank >= keep[2]) & (rank < keep[1]),
        "coarse_neg": (rank >= keep[1]) & (rank < keep[0]),
        "prerank_neg": rank >= keep[0],
    }
    rows = {
        "request_id": np.repeat(np.arange(n_req), candidates),
        "request_timestamp": np.repeat(req_time, candidates),
        "user_id": np.repeat(req_user, candidates),
        "video_id": cand.reshape(-1),
    }
    all_stage = pd.DataFrame({**rows, **{k: v.reshape(-1).astype(np.int64) for k, v in flags.items()}})
    for k, v in profile.items():
        all_stage[k] = v[all_stage["user_id"].to_numpy()]
    for k, v in item_cols.items():
        all_stage[k] = v[all_stage["video_id"].to_numpy()]
    show = all_stage[all_stage["realshow"] == 1].reset_index(drop=True)
    aff = affinity.reshape(-1)[all_stage["realshow"].to_numpy() == 1]
    u = show["user_id"].to_numpy()
    frac = 1.0 / (1.0 + np.exp(-(sharpness * (aff - watch_offset) + bias[u] + 0.5 * rng.standard_normal(len(show)))))
    dur = duration[show["video_id"].to_numpy()]
    realshow = show[list(_ID + USER_FIELDS + ITEM_FIELDS)].copy()
    realshow["duration"] = dur.astype(np.int64)
    realshow["playing_time"] = (frac * dur).round().astype(np.int64)
    realshow["effective_view"] = (frac >= 0.3).astype(np.int64)
    realshow["long_view"] = (frac >= 0.95).astype(np.int64)
    realshow["like"] = (realshow["effective_view"].to_numpy() * (rng.random(len(show)) < 0.2)).astype(np.int64)
    for k in ("follow", "forward", "comment"):
        realshow[k] = (realshow["effective_view"].to_numpy() * (rng.random(len(show)) < 0.02)).astype(np.int64)
    return realshow, all_stage


def write_recflow(folder: str | Path, realshow: pd.DataFrame, all_stage: pd.DataFrame | None, *, days: int = 2) -> Path:
    """Write RecFlow frames as a RecFlow folder (``realshow/`` and ``all_stage/`` feather day
    files, requests cut into ``days`` files by time)."""
    folder = Path(folder)
    edges = np.quantile(realshow["request_timestamp"], np.linspace(0, 1, days + 1))
    for sub, frame in (("realshow", realshow), ("all_stage", all_stage)):
        if frame is None:
            continue
        (folder / sub).mkdir(parents=True, exist_ok=True)
        day = np.clip(np.searchsorted(edges, frame["request_timestamp"], side="right") - 1, 0, days - 1)
        for d in range(days):
            part = frame[day == d].reset_index(drop=True)
            part.to_feather(folder / sub / f"2024-01-{13 + d:02d}.feather")
    return folder
