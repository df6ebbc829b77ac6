"""Splits: from a canonical :class:`~fedrec.data.Dataset` to id-remapped, time-sorted
sequences with a train / valid / test label per interaction.

Methods
-------
``leave-last-two-out``
    Per sequence (a user, or a (user, domain) pair on multi-domain data), interactions are
    sorted by time with a *stable* sort, so ties keep their file order; the last one is
    test, the second-to-last valid, the rest train. Sequences with fewer than
    ``min_interactions`` (default 3) interactions are dropped.
``ratio``
    A time-ordered ratio split (RecBole's ``RS`` with ``order: TO``): ``ratios`` (default
    ``[0.8, 0.1, 0.1]``: train / valid / test, each > 0, summing to 1) of the interactions
    by time.
    ``order = "user"`` (default; RecBole's ``group_by: user``) cuts each sequence on its
    own: the earliest 80 % of a user's interactions train, the next 10 % valid, the rest
    test. ``order = "global"`` makes one cut through all interactions sorted by time: the
    earliest 80 % of the whole log train, and so on (a user may then have no training
    row). Ties in time keep their file order (stable sort). Rounding is RecBole's: of
    ``n`` interactions, ``floor(r * n)`` go to valid and to test and the rest to train;
    then, from test backwards, a part whose share ``r * n`` lies strictly between 0 and 1
    takes one interaction from train while train keeps more than one. So 3 interactions
    split 1 / 1 / 1, 2 split 1 / 0 / 1, 1 stays in train, 10 split 8 / 1 / 1, 25 split
    21 / 2 / 2. ``min_interactions`` (default 3) drops shorter sequences first, in both
    orders. Evaluation then holds several items per user: see
    :func:`~fedrec.data.batching.target_groups`.
``files``
    The files' own split (the ``split`` column, e.g. the CDR folders' train/valid/test).
``auto`` (default)
    ``files`` when the data carries a split, else ``leave-last-two-out``.

Ids are remapped to contiguous indices: users 1..U and items 1..I in increasing raw-id
order, **0 reserved for padding** everywhere (features, groups and the domain of item 0).

With a :class:`~fedrec.data.catalogue.Catalogue` (a federated node's split), item indices,
item features and domains come from the catalogue instead of the data: rows whose item the
catalogue lacks are dropped before splitting and counted in ``out_of_catalogue``; the user
feature fields are the catalogue's (their codes are checked against its cardinalities).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, TypeVar

import numpy as np
import pandas as pd

from fedrec.data.interactions import Dataset
from fedrec.errors import ConfigError, DataError

__all__ = ["SplitConfig", "SplitData", "split_dataset", "ratio_counts", "TRAIN", "VALID", "TEST", "PART_NAMES",
           "DEFAULT_RATIOS"]

TRAIN, VALID, TEST = 0, 1, 2
PART_NAMES = ("train", "valid", "test")
_METHODS = ("auto", "leave-last-two-out", "ratio", "files")
_ORDERS = ("user", "global")
#: train / valid / test shares of a ratio split unless ``ratios`` are given (RecBole's default)
DEFAULT_RATIOS = (0.8, 0.1, 0.1)
T = TypeVar("T")


@dataclass(frozen=True)
class SplitConfig:
    """How to split (the ``[split]`` table of a config file): ``method`` (auto,
    leave-last-two-out, ratio, files), ``min_interactions``, and for ``ratio`` the
    ``ratios`` (train, valid, test; default 0.8, 0.1, 0.1) and the ``order`` (``user`` or
    ``global``; default ``user``). See the module docstring."""

    method: Literal["auto", "leave-last-two-out", "ratio", "files"] = "auto"
    min_interactions: int = 3
    #: train / valid / test shares (method ``ratio`` only): three numbers > 0 summing to 1;
    #: None = :data:`DEFAULT_RATIOS`
    ratios: tuple[float, ...] | None = None
    #: ``user`` (each sequence cut on its own) or ``global`` (one cut by time); method
    #: ``ratio`` only; None = ``user``
    order: str | None = None

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ConfigError(f"split method must be one of {', '.join(_METHODS)} (got {self.method!r})")
        if (not isinstance(self.min_interactions, numbers.Integral) or isinstance(self.min_interactions, bool)
                or self.min_interactions < 1):
            raise ConfigError(f"min_interactions must be a positive integer (got {self.min_interactions!r})")
        if self.method != "ratio":
            for key in ("ratios", "order"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"split option '{key}' applies only to method 'ratio' (method is {self.method!r})")
            return
        object.__setattr__(self, "ratios", _check_ratios(DEFAULT_RATIOS if self.ratios is None else self.ratios))
        order = "user" if self.order is None else self.order
        if order not in _ORDERS:
            raise ConfigError(f"split option 'order' must be user or global (got {order!r})")
        object.__setattr__(self, "order", order)


def _check_ratios(value: Any) -> tuple[float, float, float]:
    """``value`` as three train / valid / test shares, or a one-line :class:`ConfigError`."""
    if isinstance(value, str):  # "0.8,0.1,0.1" from a command line
        value = [v.strip() for v in value.split(",")]
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ConfigError(f"split option 'ratios' must be three numbers train, valid, test, e.g. [0.8, 0.1, 0.1] "
                          f"(got {value!r})")
    out = []
    for v in value:
        try:
            if isinstance(v, bool):
                raise ValueError
            f = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"split option 'ratios': {v!r} is not a number") from None
        if not np.isfinite(f) or f <= 0:
            raise ConfigError(f"split option 'ratios': each share must be a number > 0 (train, valid and test are "
                              f"all needed; got {v!r})")
        out.append(f)
    if abs(sum(out) - 1.0) > 1e-6:
        raise ConfigError(f"split option 'ratios' must sum to 1 (got {', '.join(map(repr, value))}, sum {sum(out):g})")
    return tuple(out)  # type: ignore[return-value]


def ratio_counts(n: np.ndarray, ratios: tuple[float, float, float]) -> np.ndarray:
    """``(len(n), 3)`` train / valid / test counts of sequences of ``n`` interactions under
    ``ratios``, rounded as RecBole's ``split_by_ratio`` (see the module docstring)."""
    n = np.asarray(n, dtype=np.int64)
    # floor(r * n) with a tolerance, so that 0.1 * 10 is 1 and not 0.999...
    share = np.asarray(ratios, dtype=np.float64)[None, :] * n[:, None]
    cnt = np.floor(share + 1e-9).astype(np.int64)
    cnt[:, 0] = n - cnt[:, 1:].sum(axis=1)
    for part in (2, 1):  # test first, then valid (RecBole's order)
        give = (cnt[:, 0] > 1) & (share[:, part] > 1e-9) & (share[:, part] < 1 - 1e-9) & (cnt[:, part] == 0)
        cnt[give, part] += 1
        cnt[give, 0] -= 1
    return cnt


@dataclass
class SplitData:
    """Time-sorted, id-remapped interactions grouped into sequences, with a split per row.

    Rows are grouped by sequence (``indptr``, CSR-style: the rows of sequence ``s`` are
    ``indptr[s]:indptr[s+1]``) and sorted by time inside each sequence. A sequence is one
    user on single-domain data and one (user, domain) pair on multi-domain data.

    Attributes
    ----------
    n_users, n_items:
        Number of real users / items; indices run 1..n (0 is padding).
    user_raw, item_raw:
        Raw id of each index (position 0 holds -1 for padding).
    domains:
        Domain names (empty for single-domain data); ``item_domain[i]`` is the domain index
        of item ``i`` (-1 for padding and on single-domain data).
    seq_user, seq_domain, indptr:
        The sequences: their user index, domain index (-1 without domains), row ranges.
    item, label, time, part:
        Per row: item index, 0/1 label (1 for implicit positives), time, and
        ``TRAIN``/``VALID``/``TEST``.
    has_labels:
        Whether labels are real 0/1 feedback (CTR data) or implicit positives.
    user_features, item_features:
        ``(n_users + 1, F)`` / ``(n_items + 1, F)`` integer code arrays aligned with the
        indices (row 0 = padding, all zeros), or ``None``; ``*_feature_names`` name columns.
    user_group:
        True latent group of each user index (0 for padding) on synthetic data, else None.
    method:
        The split method actually used.
    user_cardinalities, out_of_catalogue:
        Set when the split was built on a catalogue (see the module docstring).
    """

    n_users: int
    n_items: int
    user_raw: np.ndarray
    item_raw: np.ndarray
    domains: list[str]
    item_domain: np.ndarray
    seq_user: np.ndarray
    seq_domain: np.ndarray
    indptr: np.ndarray
    item: np.ndarray
    label: np.ndarray
    time: np.ndarray
    part: np.ndarray
    has_labels: bool
    user_features: np.ndarray | None
    item_features: np.ndarray | None
    user_feature_names: list[str]
    item_feature_names: list[str]
    user_group: np.ndarray | None
    method: str
    #: per user field, the number of codes that sizes the model's tables (from a catalogue;
    #: None: max code + 1 of this split's users)
    user_cardinalities: tuple[int, ...] | None = None
    #: rows dropped because the catalogue lacks their item (0 without a catalogue)
    out_of_catalogue: int = 0
    #: per row, the explicit rating (float32, NaN where the source has none), or None when
    #: the data has no rating column (the second behaviour of the multi-behaviour head)
    rating: np.ndarray | None = None
    #: per row, the ``value`` column (a regression target such as a watch time, float32),
    #: or None when the data has none
    value: np.ndarray | None = None
    #: the stage samples (:attr:`~fedrec.data.interactions.Dataset.stage_samples`) of this
    #: split's users and items, sorted by (user, time): ``stage_user`` (user index),
    #: ``stage_time``, ``stage_item`` (item index), ``stage_level``; None without any
    stage_user: np.ndarray | None = None
    stage_time: np.ndarray | None = None
    stage_item: np.ndarray | None = None
    stage_level: np.ndarray | None = None
    #: per item index, its text (:attr:`~fedrec.data.interactions.Dataset.item_text`; "" for
    #: the padding item and items without one), or None when the data has none
    item_text: np.ndarray | None = None

    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # -- derived views (computed once: treat a SplitData as immutable) ---------------
    def cached(self, key: object, compute: Callable[[], T]) -> T:
        """``compute()`` once per ``key``, kept on this split (for per-client reuse)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    @property
    def n_sequences(self) -> int:
        """Number of sequences (users, or (user, domain) pairs)."""
        return len(self.seq_user)

    @property
    def row_seq(self) -> np.ndarray:
        """Sequence index of every row."""
        return self.cached("row_seq", lambda: np.repeat(np.arange(self.n_sequences), np.diff(self.indptr)))

    @property
    def row_user(self) -> np.ndarray:
        """User index of every row."""
        return self.cached("row_user", lambda: np.repeat(self.seq_user, np.diff(self.indptr)))

    def part_counts(self) -> dict[str, int]:
        """Number of rows in each split."""
        counts = np.bincount(self.part, minlength=3)
        return {name: int(counts[i]) for i, name in enumerate(PART_NAMES)}

    def sequence_items(self, s: int, parts: tuple[int, ...] = (TRAIN,)) -> np.ndarray:
        """Raw ids of the items of sequence ``s`` in the given parts, in time order."""
        rows = slice(self.indptr[s], self.indptr[s + 1])
        keep = np.isin(self.part[rows], parts)
        return self.item_raw[self.item[rows][keep]]

    def sequence_labels(self, s: int, parts: tuple[int, ...] = (TRAIN,)) -> np.ndarray:
        """Labels of sequence ``s`` in the given parts, in time order."""
        rows = slice(self.indptr[s], self.indptr[s + 1])
        keep = np.isin(self.part[rows], parts)
        return self.label[rows][keep]

    def seen_pairs(self, parts: tuple[int, ...] = (TRAIN, VALID, TEST)) -> np.ndarray:
        """Sorted unique keys ``user * (n_items + 1) + item`` of the rows in ``parts``."""

        def compute() -> np.ndarray:
            keep = np.isin(self.part, parts)
            return np.unique(self.row_user[keep].astype(np.int64) * (self.n_items + 1) + self.item[keep])

        return self.cached(("seen_pairs", tuple(sorted(parts))), compute)


def split_dataset(dataset: Dataset, config: SplitConfig | None = None, *, catalogue=None) -> SplitData:
    """Remap ids and split ``dataset`` as ``config`` says (see the module docstring);
    with ``catalogue``, items are indexed by it."""
    config = config or SplitConfig()
    inter = dataset.interactions
    frame = inter.frame
    out_of_catalogue = 0
    if catalogue is not None:
        known = catalogue.index(frame["item"].to_numpy()) > 0
        out_of_catalogue = int((~known).sum())
        if out_of_catalogue:
            frame = frame.loc[known].reset_index(drop=True)
            if len(frame) == 0:
                raise DataError("no interaction has an item of the catalogue", file=dataset.name)
    method = config.method
    if method == "auto":
        method = "files" if inter.has_split else "leave-last-two-out"
    if method == "files" and not inter.has_split:
        raise ConfigError(f"split method 'files' needs data that carries its own split ({dataset.name} has none)")

    domains = inter.domains
    if catalogue is not None and catalogue.domains:
        unknown = sorted(set(domains) - set(catalogue.domains))
        if unknown:
            raise DataError(f"domain {unknown[0]!r} is not in the catalogue (it has {', '.join(catalogue.domains)})",
                            file=dataset.name)
        domains = list(catalogue.domains)
    dom = (
        pd.Index(domains).get_indexer(frame["domain"]).astype(np.int64)
        if domains
        else np.full(len(frame), -1, dtype=np.int64)
    )
    user_raw_rows = frame["user"].to_numpy()
    time = frame["time"].to_numpy()
    file_time = time
    # stable: lexsort keeps file order among equal (user, domain, time)
    order = np.lexsort((time, dom, user_raw_rows))
    user_raw_rows, dom, time = user_raw_rows[order], dom[order], time[order]
    item_raw_rows = frame["item"].to_numpy()[order]
    label = frame["label"].to_numpy()[order].astype(np.int8) if inter.has_labels else np.ones(len(frame), dtype=np.int8)
    rating = frame["rating"].to_numpy(dtype=np.float32)[order] if "rating" in frame.columns else None
    value = frame["value"].to_numpy(dtype=np.float32)[order] if "value" in frame.columns else None

    # sequence boundaries
    new_seq = np.ones(len(order), dtype=bool)
    new_seq[1:] = (user_raw_rows[1:] != user_raw_rows[:-1]) | (dom[1:] != dom[:-1])
    starts = np.flatnonzero(new_seq)
    lengths = np.diff(np.append(starts, len(order)))
    if method == "ratio":
        keep_seq = lengths >= config.min_interactions
        if not keep_seq.any():
            raise DataError(f"no user has at least {config.min_interactions} interactions, nothing to split",
                            file=dataset.name)
        keep = np.repeat(keep_seq, lengths)
        part = np.zeros(len(order), dtype=np.int8)
        if config.order == "user":
            cnt = ratio_counts(lengths, config.ratios)
            pos = np.arange(len(order)) - np.repeat(starts, lengths)  # position within the sequence
            part[pos >= np.repeat(cnt[:, 0], lengths)] = VALID
            part[pos >= np.repeat(cnt[:, 0] + cnt[:, 1], lengths)] = TEST
        else:  # one cut through the kept rows by time (file order among ties)
            kept = np.flatnonzero(keep[np.argsort(order)])  # kept rows, in file order
            by_time = kept[np.argsort(file_time[kept], kind="stable")]
            cnt = ratio_counts(np.array([len(by_time)]), config.ratios)[0]
            file_part = np.zeros(len(order), dtype=np.int8)
            file_part[by_time[cnt[0]:]] = VALID
            file_part[by_time[cnt[0] + cnt[1]:]] = TEST
            part = file_part[order]
    elif method == "leave-last-two-out":
        keep_seq = lengths >= config.min_interactions
        if not keep_seq.any():
            raise DataError(
                f"no user has at least {config.min_interactions} interactions, nothing to split",
                file=dataset.name,
            )
        keep = np.repeat(keep_seq, lengths)
        part = np.zeros(len(order), dtype=np.int8)
        # only kept sequences get valid/test rows; a sequence of length 1 (kept when
        # min_interactions == 1) has a test row and no valid row
        ends = (starts + lengths)[keep_seq]
        part[ends[lengths[keep_seq] >= 2] - 2] = VALID
        part[ends - 1] = TEST
    else:
        part = pd.Index(PART_NAMES).get_indexer(frame["split"].to_numpy()[order]).astype(np.int8)
        keep = np.ones(len(order), dtype=bool)
    user_raw_rows, item_raw_rows, dom, time, label, part = (
        a[keep] for a in (user_raw_rows, item_raw_rows, dom, time, label, part)
    )
    if rating is not None:
        rating = rating[keep]
    if value is not None:
        value = value[keep]
    if len(user_raw_rows) == 0:
        raise DataError("no interactions left after splitting", file=dataset.name)

    user_raw = np.unique(user_raw_rows)
    user_idx = np.searchsorted(user_raw, user_raw_rows) + 1
    if catalogue is not None:
        item_raw = catalogue.item_raw
        item_idx = catalogue.index(item_raw_rows)
    else:
        item_raw = np.unique(item_raw_rows)
        item_idx = np.searchsorted(item_raw, item_raw_rows) + 1

    new_seq = np.ones(len(user_idx), dtype=bool)
    new_seq[1:] = (user_idx[1:] != user_idx[:-1]) | (dom[1:] != dom[:-1])
    starts = np.flatnonzero(new_seq)
    indptr = np.append(starts, len(user_idx)).astype(np.int64)

    item_domain = np.full(len(item_raw) + 1, -1, dtype=np.int64)
    user_cards = None
    if catalogue is None:
        item_domain[item_idx] = dom
        user_features, user_names = _align_features(dataset.user_features, user_raw, "user", dataset.name)
        item_features, item_names = _align_features(dataset.item_features, item_raw, "item", dataset.name)
    else:
        if catalogue.item_domain is not None:
            item_domain[1:] = catalogue.item_domain
        item_names = list(catalogue.item_feature_names)
        item_features = None
        if catalogue.item_features is not None:
            item_features = np.vstack([np.zeros((1, len(item_names)), dtype=np.int64), catalogue.item_features])
        user_features, user_names, user_cards = _catalogue_user_features(dataset, user_raw, catalogue)
    user_group = None
    if dataset.user_groups is not None:
        user_group = np.zeros(len(user_raw) + 1, dtype=np.int64)
        user_group[1:] = dataset.user_groups.reindex(user_raw).fillna(0).to_numpy(dtype=np.int64)

    stages = _stage_samples(dataset, user_raw, item_raw if catalogue is None else None, catalogue)
    return SplitData(
        n_users=len(user_raw),
        n_items=len(item_raw),
        user_raw=np.concatenate([[-1], user_raw]).astype(np.int64),
        item_raw=np.concatenate([[-1], item_raw]).astype(np.int64),
        domains=list(domains),
        item_domain=item_domain,
        seq_user=user_idx[starts].astype(np.int64),
        seq_domain=dom[starts].astype(np.int64),
        indptr=indptr,
        item=item_idx.astype(np.int64),
        label=label,
        time=time,
        part=part,
        has_labels=inter.has_labels,
        user_features=user_features,
        item_features=item_features,
        user_feature_names=user_names,
        item_feature_names=item_names,
        user_group=user_group,
        method=method,
        user_cardinalities=user_cards,
        out_of_catalogue=out_of_catalogue,
        rating=rating,
        value=value,
        item_text=_item_texts(dataset, item_raw),
        **stages,
    )


def _item_texts(dataset: Dataset, item_raw: np.ndarray) -> np.ndarray | None:
    """``(n_items + 1,)`` object array of item texts ("" where unknown), or None."""
    if dataset.item_text is None:
        return None
    text = dataset.item_text.reindex(np.asarray(item_raw)).fillna("").astype(str).to_numpy(dtype=object)
    return np.concatenate([np.array([""], dtype=object), text])


def _stage_samples(dataset: Dataset, user_raw: np.ndarray, item_raw: np.ndarray | None, catalogue) -> dict[str, Any]:
    """The split's stage-sample arrays. Samples of users outside the split, and of items
    outside its item space (the interactions' items, or the catalogue's), are dropped: a
    candidate that was never exposed to anyone has no index."""
    frame = dataset.stage_samples
    if frame is None or len(frame) == 0:
        return {}
    users = frame["user"].to_numpy(np.int64)
    pos = np.searchsorted(user_raw, users)
    known = (pos < len(user_raw)) & (user_raw[np.minimum(pos, len(user_raw) - 1)] == users)
    raw_items = frame["item"].to_numpy(np.int64)
    if catalogue is not None:
        items = catalogue.index(raw_items)
        known &= items > 0
    else:
        ipos = np.searchsorted(item_raw, raw_items)
        ok = (ipos < len(item_raw)) & (item_raw[np.minimum(ipos, len(item_raw) - 1)] == raw_items)
        known &= ok
        items = ipos + 1
    user_idx = (pos + 1)[known]
    time = frame["time"].to_numpy()[known]
    order = np.lexsort((time, user_idx))
    return {"stage_user": user_idx[order].astype(np.int64), "stage_time": time[order],
            "stage_item": np.asarray(items)[known][order].astype(np.int64),
            "stage_level": frame["stage"].to_numpy(np.int8)[known][order]}


def _catalogue_user_features(dataset: Dataset, user_raw: np.ndarray, catalogue):
    """The user feature fields the catalogue declares, aligned with ``user_raw``, with codes
    checked against the catalogue's cardinalities (fields the catalogue does not declare are
    not read: the catalogue is the model's schema)."""
    names = list(catalogue.user_feature_names)
    if not names:
        return None, [], None
    table = dataset.user_features
    if table is None:
        raise DataError(f"the catalogue declares user features ({', '.join(names)}) but this data has none "
                        "(a node's user features come with its data, e.g. parquet:...?user_features=FILE)",
                        file=dataset.name)
    missing = [n for n in names if n not in [str(c) for c in table.columns]]
    if missing:
        raise DataError("user feature field of the catalogue missing from the data", file=dataset.name,
                        column=missing[0])
    table = table.rename(columns=str)[names]
    codes, _ = _align_features(table, user_raw, "user", dataset.name)
    for j, (name, card) in enumerate(zip(names, catalogue.user_cardinalities)):
        over = codes[:, j] >= card
        if over.any():
            raise DataError(f"user feature code beyond the catalogue's {card} codes", file=dataset.name, column=name,
                            value=int(codes[over, j][0]))
    return codes, names, tuple(catalogue.user_cardinalities)


def _align_features(table: pd.DataFrame | None, raw: np.ndarray, kind: str, name: str):
    """``(len(raw) + 1, F)`` code array aligned with the indices; unknown ids get code 0."""
    if table is None or table.shape[1] == 0:
        return None, []
    aligned = table.reindex(raw)
    missing = aligned.isna().any(axis=1).to_numpy()
    if missing.all():
        raise DataError(f"no {kind} in the interactions has a feature row", file=name)
    codes = aligned.fillna(0).to_numpy(dtype=np.int64)
    return np.vstack([np.zeros((1, codes.shape[1]), dtype=np.int64), codes]), [str(c) for c in table.columns]
