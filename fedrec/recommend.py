"""Top-k recommendations from a trained model: what each user should see next.

The pieces, each usable alone:

* :func:`recommend` — any ``score_fn(user_indices) -> (len(users), n_items + 1)`` scores
  (column 0 = padding) to a table ``user, rank, item, score`` of **raw ids**, the top ``k``
  items per user, ties broken by item index, items the user interacted with (in any part:
  train, valid or test) left out unless ``exclude_seen=False``.
* :func:`serving_batch` — the model input for "what comes after the user's **whole**
  history": the last ``max_len`` of the user's train + valid + test interactions in time
  order, built by the same machinery as the evaluation examples
  (:func:`fedrec.data.batching.build_examples`), so tokens follow the evaluation's rules (on
  click logs, next item reads only clicks; CTR reads every impression with its label).
* :func:`centralised_scorer` — a ``score_fn`` of a centralised model: next item, the model's
  own all-item scores (``score_all``) after the whole history; CTR, the predicted click
  probability of every catalogue item as the next impression (``predict_ctr_candidates``).
* :func:`load_centralised` — a ``fedrec train --checkpoint`` file or ``--resume`` state (its
  best weights) back as a model (:func:`fedrec.train.load_saved`).
* :func:`users_from_file`, :func:`write_recommendations` — a file of raw user ids in; the
  table out as ``.csv``, ``.parquet`` or ``.jsonl``, written atomically.

Multi-domain data (sequences per (user, domain)) has no single "whole history" per user:
:func:`serving_batch` refuses it; :func:`recommend` itself works on any split.
"""

from __future__ import annotations

import json
import numbers
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from fedrec.data.batching import ExampleSet, _last_rows, iterate_batches
from fedrec.data.io import iter_lines, resolve_file
from fedrec.data.split import SplitData
from fedrec.device import to_device
from fedrec.errors import ConfigError, DataError
from fedrec.files import atomic_path
from fedrec.models.base import RecModel

__all__ = [
    "COLUMNS",
    "FORMATS",
    "ScoreFn",
    "recommend",
    "users_from_file",
    "raw_user_ids",
    "serving_history",
    "serving_batch",
    "centralised_scorer",
    "load_centralised",
    "write_recommendations",
]

#: the columns of a recommendation table
COLUMNS = ("user", "rank", "item", "score")
#: the file suffixes :func:`write_recommendations` writes
FORMATS = (".csv", ".parquet", ".jsonl")

#: user indices ``(B,)`` -> scores ``(B, n_items + 1)`` (column 0 = padding)
ScoreFn = Callable[[np.ndarray], "torch.Tensor | np.ndarray"]

_INTEGER = re.compile(r"[+-]?\d+")


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer (got {value!r})")
    return int(value)


def _user_indices(split: SplitData, users: np.ndarray | None) -> np.ndarray:
    """``users`` checked as user indices (1..n_users); None -> every user."""
    if users is None:
        return np.arange(1, split.n_users + 1, dtype=np.int64)
    arr = np.asarray(users)
    if arr.ndim != 1:
        raise ConfigError(f"users must be a 1-D array of user indices (got shape {arr.shape})")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"users must be integer user indices (got dtype {arr.dtype})")
    arr = arr.astype(np.int64)
    bad = (arr < 1) | (arr > split.n_users)
    if bad.any():
        raise ConfigError(f"user index {int(arr[bad][0])} is not in 1..{split.n_users}")
    return arr


def _as_scores(scores: Any, n_rows: int, n_cols: int) -> np.ndarray:
    """``score_fn``'s output as a ``(n_rows, n_cols)`` float64 array (exact for float32)."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().to("cpu", torch.float64).numpy()
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (n_rows, n_cols):
        raise ConfigError(f"score_fn returned scores of shape {scores.shape}, expected {(n_rows, n_cols)} "
                          "(one row per user, one column per item index, column 0 = padding)")
    return scores


def _top_k(scores: np.ndarray, allowed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the (up to) ``k`` allowed columns of highest score, ties by column index.

    Returns flat ``(row, column, rank)`` arrays (rank from 1), rows ascending and ranks
    ascending within a row. Only the candidates at or above each row's k-th largest score
    are sorted (all of them when many tie), not the whole row.
    """
    n_rows, n_cols = scores.shape
    work = np.where(allowed, scores, -np.inf)  # (B, I + 1)
    kk = min(k, n_cols)
    threshold = np.partition(work, n_cols - kk, axis=1)[:, n_cols - kk]  # (B,) k-th largest
    row, col = np.nonzero(allowed & (work >= threshold[:, None]))  # col ascending within a row
    order = np.lexsort((col, -work[row, col], row))  # by row, score descending, then item index
    row, col = row[order], col[order]
    rank = np.arange(row.size) - np.searchsorted(row, np.arange(n_rows))[row]
    keep = rank < k
    return row[keep], col[keep], rank[keep] + 1


def _empty_frame() -> pd.DataFrame:
    return pd.DataFrame({"user": np.zeros(0, np.int64), "rank": np.zeros(0, np.int64),
                         "item": np.zeros(0, np.int64), "score": np.zeros(0, np.float64)})


def recommend(
    split: SplitData,
    score_fn: ScoreFn,
    *,
    users: np.ndarray | None = None,
    k: int = 10,
    exclude_seen: bool = True,
    batch_size: int = 256,
    progress: bool = False,
) -> pd.DataFrame:
    """The top ``k`` items of each user as a table ``user, rank, item, score``.

    Parameters
    ----------
    split:
        The data the model was trained on (ids, and the interactions to exclude).
    score_fn:
        ``(B,)`` user indices -> ``(B, n_items + 1)`` scores (a tensor or an array), higher
        is better; column 0 (padding) is never recommended.
    users:
        User **indices** (1..n_users), in the order the table lists them; None: every user.
    k:
        Items per user; a user with fewer than ``k`` candidates gets all of them.
    exclude_seen:
        Leave out every item the user interacted with in any part (train, valid, test;
        :meth:`SplitData.seen_pairs`).
    batch_size:
        Users scored per ``score_fn`` call.
    progress:
        Show a progress bar over users.

    Returns
    -------
    One row per (user, rank): ``user`` and ``item`` are **raw ids** (``split.user_raw`` /
    ``split.item_raw``), ``rank`` runs from 1, ``score`` is non-increasing with rank; ties
    are broken by item index (the smaller first), so the table is deterministic. A NaN score
    on a candidate item is an error.
    """
    users = _user_indices(split, users)
    k = _positive_int(k, "k")
    batch_size = _positive_int(batch_size, "batch_size")
    n_cols = split.n_items + 1
    if exclude_seen:
        seen = split.seen_pairs()  # sorted keys user * (n_items + 1) + item
        seen_user, seen_item = seen // n_cols, seen % n_cols
    frames = []
    from tqdm.auto import tqdm

    with tqdm(total=len(users), desc="recommend", unit="user", disable=not progress, leave=False) as bar:
        for start in range(0, len(users), batch_size):
            batch = users[start : start + batch_size]  # (B,)
            scores = _as_scores(score_fn(batch), len(batch), n_cols)  # (B, I + 1)
            allowed = np.ones(scores.shape, dtype=bool)
            allowed[:, 0] = False  # padding
            if exclude_seen:
                # the seen keys of each batch user are one contiguous run of the sorted keys
                first = np.searchsorted(seen_user, batch, side="left")
                counts = np.searchsorted(seen_user, batch, side="right") - first  # (B,)
                offsets = np.cumsum(counts) - counts
                idx = np.repeat(first - offsets, counts) + np.arange(int(counts.sum()))
                allowed[np.repeat(np.arange(len(batch)), counts), seen_item[idx]] = False
            allowed &= ~np.isneginf(scores)  # -inf: not a candidate (e.g. another domain's item)
            nan = np.isnan(scores) & allowed
            if nan.any():
                r, c = np.argwhere(nan)[0]
                raise ConfigError(f"score_fn gave a NaN score (user {int(split.user_raw[batch[r]])}, "
                                  f"item {int(split.item_raw[c])})")
            row, col, rank = _top_k(scores, allowed, k)
            frames.append(pd.DataFrame({"user": split.user_raw[batch[row]], "rank": rank.astype(np.int64),
                                        "item": split.item_raw[col], "score": scores[row, col]}))
            bar.update(len(batch))
    if not frames:
        return _empty_frame()
    return pd.concat(frames, ignore_index=True)


def raw_user_ids(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(raw ids, line numbers)`` of a file of raw user ids, one a line (see
    :func:`users_from_file` for the format); a non-integer line is a one-line error."""
    file = resolve_file(path)
    ids: list[int] = []
    lines: list[int] = []
    first = True
    for number, line in iter_lines(file):
        if first and line.lower() == "user":
            first = False
            continue
        first = False
        if not _INTEGER.fullmatch(line):
            raise DataError("not an integer user id", file=file, row=number, value=line)
        ids.append(int(line))
        lines.append(number)
    if not ids:
        raise DataError("no user ids in this file", file=file)
    return np.asarray(ids, dtype=np.int64), np.asarray(lines, dtype=np.int64)


def users_from_file(path: str | Path, split: SplitData, *, unknown: str = "error") -> np.ndarray:
    """User indices of the raw user ids in ``path``, one id a line, in file order.

    Blank lines are skipped, a first line ``user`` is a header, a repeated id is kept once
    (its first line). A line that is not an integer, or (``unknown="error"``) an id the data
    does not have, is a one-line :class:`~fedrec.errors.DataError` naming the file, line and
    value; ``unknown="skip"`` leaves such ids out (a federated client serves only its own
    users). A file with no id at all is an error too. ``.gz`` files are read transparently.
    """
    file = resolve_file(path)
    raw, lines = raw_user_ids(file)
    raw_ids = split.user_raw[1:]  # sorted ascending (ids are remapped in raw-id order)
    pos = np.minimum(np.searchsorted(raw_ids, raw), len(raw_ids) - 1)
    known = raw_ids[pos] == raw
    if unknown == "error" and not known.all():
        i = int(np.flatnonzero(~known)[0])
        raise DataError("unknown user id (not in the data)", file=file, row=int(lines[i]), value=str(raw[i]))
    found_arr = (pos + 1)[known].astype(np.int64)
    _, first_line = np.unique(found_arr, return_index=True)
    return found_arr[np.sort(first_line)]


def serving_history(split: SplitData, *, task: str, max_len: int) -> np.ndarray:
    """``(n_users + 1, max_len)`` row indices of each user's whole history: the last
    ``max_len`` of the user's train + valid + test rows in time order, left-padded with -1
    (row 0, the padding user, is all -1).

    The rows are those the evaluation reads as history for ``task``
    (:func:`~fedrec.data.batching.build_examples`): on click logs (real 0/1 labels) next item
    reads clicks only, CTR every impression. Kept on ``split`` (computed once per task and
    length). Multi-domain data is refused: a user there has one sequence per domain.
    """
    if task not in ("ctr", "next_item"):
        raise ConfigError(f"recommendations are for the ctr and next_item tasks (got {task!r})")
    max_len = _positive_int(max_len, "max_len")
    if split.domains:
        raise ConfigError(f"recommendations on multi-domain data (domains {', '.join(split.domains)}) are not "
                          "supported: a user has one history per domain")

    def compute() -> np.ndarray:
        # as build_examples' evaluation histories, over every part
        usable = split.label == 1 if task != "ctr" and split.has_labels else np.ones(len(split.part), dtype=bool)
        rows = np.flatnonzero(usable)
        by_seq = _last_rows(rows, split.row_seq[rows], split.n_sequences, max_len)  # (n_seq, max_len)
        out = np.full((split.n_users + 1, max_len), -1, dtype=np.int64)
        out[split.seq_user] = by_seq  # single-domain: one sequence per user
        return out

    return split.cached(("serving_history", task, max_len), compute)


def serving_batch(split: SplitData, users: np.ndarray, max_len: int, *, task: str) -> dict[str, torch.Tensor]:
    """The model input of ``users`` (indices) for "what comes after the whole history".

    The batch has the keys of an evaluation batch (:func:`~fedrec.data.batching.iterate_batches`):
    ``user`` (B,), ``items`` / ``labels`` (B, max_len) — :func:`serving_history`, 0 =
    padding, the most recent interaction in the last column — and an empty target
    (``target_items`` 0, ``target_mask`` False): the model scores what follows the last
    position.
    """
    users = _user_indices(split, users)
    history = serving_history(split, task=task, max_len=max_len)[users]  # (B, max_len)
    seq = np.empty(split.n_users + 1, dtype=np.int64)
    seq[split.seq_user] = np.arange(split.n_sequences)
    examples = ExampleSet(task, "serve", split, seq[users], history, np.full_like(history, -1), int(max_len))
    return next(iterate_batches(examples, batch_size=max(1, len(users))))


def cdr_batch(split: SplitData, users: np.ndarray, domain: int, *, eval_len: int) -> dict[str, torch.Tensor]:
    """The cross-domain model input of ``users`` (indices) in ``domain`` (index): own-domain
    context = the user's latest ``eval_len`` training items there, other-domain context = its
    latest ``eval_len`` training items in the other domains (rows in time order)."""
    from fedrec.data.split import TRAIN

    users = _user_indices(split, users)
    train = split.part == TRAIN
    # the sequences of each user: one per (user, domain), rows indptr[s]:indptr[s + 1]
    seqs_of = split.cached("seqs_by_user", lambda: np.split(np.argsort(split.seq_user, kind="stable"),
                                                          np.cumsum(np.bincount(split.seq_user,
                                                                                minlength=split.n_users + 1))[:-1]))
    own = np.zeros((len(users), eval_len), dtype=np.int64)
    other = np.zeros((len(users), eval_len), dtype=np.int64)
    for i, u in enumerate(users):
        here, there = [], []
        for s in seqs_of[u]:
            rows = np.arange(split.indptr[s], split.indptr[s + 1])
            items = split.item[rows[train[rows]]]
            (here if split.seq_domain[s] == domain else there).append(items)
        here = np.concatenate(here)[-eval_len:] if here else np.zeros(0, dtype=np.int64)
        there = np.concatenate(there)[-eval_len:] if there else np.zeros(0, dtype=np.int64)
        own[i, : len(here)], other[i, : len(there)] = here, there
    return {"user": torch.from_numpy(users), "domain": torch.full((len(users),), int(domain), dtype=torch.long),
            "own_items": torch.from_numpy(own), "other_items": torch.from_numpy(other)}


def domain_index(split: SplitData, domain: str | None) -> int:
    """The index of ``domain`` on cross-domain data (a one-line error naming the domains
    when it is missing or unknown)."""
    if not split.domains:
        raise ConfigError("--domain applies to cross-domain data only")
    if domain is None:
        raise ConfigError(f"cross-domain data: choose the domain to recommend in with --domain "
                          f"({', '.join(split.domains)})")
    if domain not in split.domains:
        raise ConfigError(f"unknown domain {domain!r} (the data has {', '.join(split.domains)})")
    return split.domains.index(domain)


def centralised_scorer(model: RecModel, split: SplitData, task: str, max_len: int, *,
                       chunk_elements: int = 1 << 24, domain: str | None = None) -> Callable[[np.ndarray], torch.Tensor]:
    """A ``score_fn`` for :func:`recommend` from a trained centralised ``model``.

    ``next_item``: the model's own all-item scores (``score_all``) at the position after
    the user's whole history (:func:`serving_batch`). ``ctr``: the predicted click
    probability of every item as the next impression after the whole history
    (``predict_ctr_candidates``: what ``predict_ctr`` gives with that item as the held-out
    target; the CTR head runs on item chunks of at most ``chunk_elements`` input values).
    ``cdr``: the model's scores of the items of ``domain`` (name; the others get ``-inf``,
    so they are never recommended) from the user's training items (:func:`cdr_batch`).
    The model is put in eval mode and scored without gradients.
    """
    if task != "cdr" and domain is not None:
        raise ConfigError(f"--domain applies to cross-domain models (this one is a {task} model)")
    from fedrec.train import model_device

    device = model_device(model)  # batches go where the model is
    if task == "cdr":
        d = domain_index(split, domain)
        model.eval()
        eval_len = int(getattr(model, "eval_max_len", max_len))

        @torch.no_grad()
        def score_domain(users: np.ndarray) -> torch.Tensor:
            return model.score_all(to_device(cdr_batch(split, users, d, eval_len=eval_len), device))

        return score_domain
    if task not in ("ctr", "next_item"):
        raise ConfigError(f"recommendations are for the ctr, next_item and cdr tasks (got {task!r})")
    serving_history(split, task=task, max_len=max_len)  # checks the data and the length now
    model.eval()
    all_items = torch.arange(split.n_items + 1, device=device)

    @torch.no_grad()
    def score(users: np.ndarray) -> torch.Tensor:
        batch = to_device(serving_batch(split, users, max_len, task=task), device)
        if task == "next_item":
            return model.score_all(batch)  # (B, I + 1)
        if hasattr(model, "cfg"):  # a sequence model: bound the head's memory
            return model.predict_ctr_candidates(batch, all_items, chunk_elements=chunk_elements)
        return model.predict_ctr_candidates(batch, all_items)  # (B, I + 1)

    return score


def load_centralised(path: str | Path, split: SplitData, *,
                     device: str | torch.device = "cpu") -> tuple[RecModel, str, int, dict[str, Any]]:
    """``(model, task, max_len, info)`` of a ``fedrec train --checkpoint`` file or a
    ``--resume`` training state (its best weights) for ``split``, on ``device``.

    The model is rebuilt and checked by :func:`fedrec.train.load_saved` (the loading of
    ``fedrec evaluate``): a file that is neither, a model of another split, or a state that
    finished no epoch yet is a one-line :class:`~fedrec.errors.ConfigError`. ``info`` holds
    ``model`` (name), ``kind`` (``checkpoint`` / ``state``), ``best_epoch``, ``finished``,
    ``max_len``, ``model_options`` and ``train``.
    """
    from fedrec.train import load_saved

    model, info = load_saved(path, split, device=device)
    return model, info["task"], info["max_len"], info


def write_recommendations(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a recommendation table to ``path``; the format follows the suffix: ``.csv``,
    ``.parquet`` or ``.jsonl`` (one JSON object a line). Anything else is a one-line
    :class:`~fedrec.errors.ConfigError`.

    Atomic: the table goes to a temporary file in the same folder, renamed over ``path``
    only once complete, so a failure leaves no partial file and an existing file is either
    kept whole or replaced whole. Missing folders are created. Returns ``path``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"{path}: unknown output format {path.suffix or '(no suffix)'!r} "
                          f"(accepted suffixes: {', '.join(FORMATS)})")
    with atomic_path(path) as tmp:  # the mode open() would give (an existing file's own)
        if suffix == ".csv":
            frame.to_csv(tmp, index=False)
        elif suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        else:
            # json.dumps writes floats by repr (exact round trip; pandas' to_json rounds)
            with open(tmp, "w", encoding="utf-8") as handle:
                columns = [str(c) for c in frame.columns]
                for values in frame.itertuples(index=False, name=None):
                    record = {c: (v.item() if isinstance(v, np.generic) else v) for c, v in zip(columns, values)}
                    handle.write(json.dumps(record) + "\n")
    return path
