"""Seeded negative samplers.

:class:`UniformNegativeSampler` draws items uniformly among those a user never interacted
with (in the splits it is told to exclude), restricted to the item's domain on multi-domain
data. It is vectorised: draws for a whole batch at once, with rejection of seen items
re-drawn in bulk (membership tested with a sorted key array, no per-user Python sets).

Two uses, two exclusions:

* **training negatives** (:meth:`UniformNegativeSampler.for_training`) exclude only the
  items the user interacted with in the training split, as SASRec's own code does: a
  user's validation and test items may be drawn as training negatives (excluding them
  would tell the model, through the negatives it never sees, which items are held out);
  they are drawn with replacement across a row's columns;
* **sampled-ranking candidates** (``sample(..., distinct=True)`` on a sampler excluding all
  splits, as :meth:`fedrec.data.batching.ExampleSet.candidates` builds it) are ``n``
  *distinct* items the user never interacted with in any split (so never the held-out
  item), as in the sampled protocols of SASRec / S3-Rec / UniCDR.

:class:`StageNegativeSampler` (stage-aware training on RecFlow-style data) draws some of each
training target's negatives from the candidates that the recommender funnel filtered out of
the same request (the split's stage samples of the same user and time): RecFlow's
hard-negative baseline.

:class:`FixedNegatives` reads a published list of sampled-ranking negatives per user (the
``user neg_1 ... neg_N`` format of S3-Rec's ``*_sample.txt``), so a sampled metric can be
computed on exactly the candidates a paper used. It has the same ``sample`` interface.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedrec.data.io import iter_lines, resolve_file
from fedrec.data.split import TEST, TRAIN, VALID, SplitData
from fedrec.errors import ConfigError, DataError

__all__ = ["UniformNegativeSampler", "StageIndex", "StageNegativeSampler", "FixedNegatives"]

_MAX_ROUNDS = 20


class UniformNegativeSampler:
    """Uniform negatives over items the user never interacted with.

    Parameters
    ----------
    split:
        The split data (its item index space and interactions).
    seed:
        Seed of the sampler's own generator; the same seed gives the same draws.
    exclude_parts:
        Which splits count as "interacted with" (default: all three, as in the sampled
        ranking protocols of SASRec / S3-Rec / UniCDR; training negatives use
        :meth:`for_training`, which excludes only ``TRAIN``).
    """

    def __init__(self, split: SplitData, *, seed: int, exclude_parts: tuple[int, ...] = (TRAIN, VALID, TEST)) -> None:
        self.split = split
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._keys = split.seen_pairs(exclude_parts)
        self._stride = split.n_items + 1
        # contiguous item ranges per domain (items are sorted by raw id, and raw ids of
        # different domains are disjoint ranges in every source, but do not rely on it)
        if split.domains:
            self._domain_items = [np.flatnonzero(split.item_domain == d) for d in range(len(split.domains))]
        else:
            self._domain_items = [np.arange(1, split.n_items + 1)]

    @classmethod
    def for_training(cls, split: SplitData, *, seed: int) -> UniformNegativeSampler:
        """The sampler of training negatives: it excludes only the user's training items
        (a validation or test item may be drawn, as in SASRec's code); see the module
        docstring."""
        return cls(split, seed=seed, exclude_parts=(TRAIN,))

    def _seen(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        if len(self._keys) == 0:
            return np.zeros(len(users), dtype=bool)
        keys = users.astype(np.int64) * self._stride + items
        pos = np.searchsorted(self._keys, keys)
        pos = np.minimum(pos, len(self._keys) - 1)
        return self._keys[pos] == keys

    def sample(self, users: np.ndarray, n: int, domains: np.ndarray | None = None, *,
               distinct: bool = False) -> np.ndarray:
        """``(len(users), n)`` item indices, each unseen by its user. ``domains`` (one per
        user) restricts to a domain's items.

        By default the ``n`` columns are drawn with replacement (training negatives). With
        ``distinct=True`` each row holds ``n`` distinct items (sampled-ranking candidates):
        a uniformly random ``n``-subset of the user's unseen items, and a user with fewer
        than ``n`` unseen items is a :class:`~fedrec.errors.DataError` naming the user.
        """
        users = np.asarray(users, dtype=np.int64)
        if n < 0:
            raise ConfigError(f"number of negatives must be >= 0 (got {n})")
        out = np.zeros((len(users), n), dtype=np.int64)
        if n == 0 or len(users) == 0:
            return out
        if domains is None:
            domains = np.zeros(len(users), dtype=np.int64) if not self.split.domains else None
            if domains is None:
                raise ConfigError("multi-domain data: pass the domain of each user to the sampler")
        domains = np.asarray(domains, dtype=np.int64)
        for d, pool in enumerate(self._domain_items):
            rows = np.flatnonzero(domains == d)
            if rows.size == 0:
                continue
            draw = self._distinct if distinct else self._with_replacement
            out[rows] = draw(users[rows], n, pool)
        return out

    def _unseen(self, user: int, pool: np.ndarray) -> np.ndarray:
        """The items of ``pool`` that ``user`` (an index) never interacted with, sorted."""
        lo, hi = np.searchsorted(self._keys, [user * self._stride, (user + 1) * self._stride])
        return np.setdiff1d(pool, self._keys[lo:hi] - user * self._stride)

    def _with_replacement(self, users: np.ndarray, n: int, pool: np.ndarray) -> np.ndarray:
        """``(len(users), n)`` unseen items of ``pool``, drawn with replacement."""
        u = np.repeat(users, n)
        items = pool[self.rng.integers(pool.size, size=u.size)]
        bad = self._seen(u, items)
        for _ in range(_MAX_ROUNDS):
            if not bad.any():
                break
            items[bad] = pool[self.rng.integers(pool.size, size=int(bad.sum()))]
            bad[bad] = self._seen(u[bad], items[bad])
        # rejection left a few draws for users who saw most of the pool: draw those
        # exactly from the user's unseen items
        for j in np.flatnonzero(bad):
            unseen = self._unseen(int(u[j]), pool)
            if unseen.size == 0:
                user = int(self.split.user_raw[u[j]])
                raise DataError(f"user {user} has interacted with every item of the pool; cannot sample negatives")
            items[j] = unseen[self.rng.integers(unseen.size)]
        return items.reshape(len(users), n)

    def _distinct(self, users: np.ndarray, n: int, pool: np.ndarray) -> np.ndarray:
        """``(len(users), n)`` unseen items of ``pool``, distinct within each row.

        Draws every row at once and re-draws, in bulk, the entries that are seen or repeat
        an earlier entry of their row; rows still incomplete after a few rounds (users who
        saw most of the pool) are drawn exactly, without replacement, from the user's
        unseen items. Both steps treat all unseen items alike, so each row is a uniformly
        random ``n``-subset of them.
        """
        items = pool[self.rng.integers(pool.size, size=(len(users), n))]
        todo = np.arange(len(users))  # rows that may still hold a bad entry
        for attempt in range(_MAX_ROUNDS + 1):
            sub = items[todo]
            bad = self._seen(np.repeat(users[todo], n), sub.ravel()).reshape(sub.shape)
            # repeats: every occurrence after the first of a value in its row
            order = np.argsort(sub, axis=1, kind="stable")
            ordered = np.take_along_axis(sub, order, axis=1)
            repeat = np.zeros_like(bad)
            np.put_along_axis(repeat, order[:, 1:], ordered[:, 1:] == ordered[:, :-1], axis=1)
            bad |= repeat
            keep = bad.any(axis=1)
            todo, bad = todo[keep], bad[keep]
            if todo.size == 0 or attempt == _MAX_ROUNDS:
                break
            sub = items[todo]
            sub[bad] = pool[self.rng.integers(pool.size, size=int(bad.sum()))]
            items[todo] = sub
        for r in todo:  # exact fallback
            unseen = self._unseen(int(users[r]), pool)
            if unseen.size < n:
                user = int(self.split.user_raw[users[r]])
                raise DataError(f"user {user} has {unseen.size} items never interacted with, fewer than the "
                                f"{n} distinct negatives asked for")
            items[r] = self.rng.choice(unseen, size=n, replace=False)
        return items

    def state_dict(self) -> dict:
        """The generator state, so a resumed run draws the same negatives."""
        return {"seed": self.seed, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.seed = state["seed"]
        self.rng.bit_generator.state = state["rng"]


class StageIndex:
    """The split's stage samples indexed by request: the items the recommender funnel
    filtered out of each (user, request time), with the deepest stage each reached
    (``level``: 1 pre-ranking, 2 coarse ranking, 3 ranking, 4 re-ranking). ``min_stage``
    keeps only samples that reached at least that stage."""

    def __init__(self, split: SplitData, *, min_stage: int = 1, option: str = "stage-negatives") -> None:
        if split.stage_user is None:
            raise ConfigError(f"{option} needs data with stage samples (recflow:DIR with its all_stage/ "
                              "folder, or synthetic:kind=recflow)")
        if not 1 <= min_stage <= 4:
            raise ConfigError(f"stage-min must be in 1..4 (got {min_stage})")
        self.split = split
        keep = split.stage_level >= min_stage
        self.items = split.stage_item[keep]
        self.levels = np.asarray(split.stage_level)[keep].astype(np.int64)
        times = np.asarray(split.stage_time)[keep]
        users = split.stage_user[keep]
        self._t0 = int(min(times.min(), np.min(split.time))) if times.size else 0
        span = int(max(times.max() if times.size else 0, np.max(split.time))) - self._t0 + 1
        if span * (split.n_users + 1) >= 2**62:
            raise ConfigError("stage samples: the time span is too long to index requests by (user, time)")
        self._span = span
        self._keys = users.astype(np.int64) * span + (times.astype(np.int64) - self._t0)  # sorted (user, time)

    def requests(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Start and end, in :attr:`items` / :attr:`levels`, of the stage samples of each
        split row's request (rows < 0: none)."""
        sp = self.split
        rows = np.asarray(rows, dtype=np.int64)
        safe = np.maximum(rows, 0)
        keys = sp.row_user[safe].astype(np.int64) * self._span + (np.asarray(sp.time)[safe].astype(np.int64) - self._t0)
        lo = np.searchsorted(self._keys, keys, side="left")
        hi = np.searchsorted(self._keys, keys, side="right")
        hi = np.where(rows >= 0, hi, lo)
        return lo, hi

    def padded(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(items, levels)``, each ``(len(rows), M)``: every stage sample of each row's
        request (``M`` the largest request), padded with item 0 and level 0."""
        lo, hi = self.requests(rows)
        size = hi - lo
        width = int(size.max()) if len(size) else 0
        col = np.arange(width)[None, :]
        has = col < size[:, None]
        at = np.where(has, lo[:, None] + col, 0)
        if len(self.items) == 0:
            return np.zeros(has.shape, dtype=np.int64), np.zeros(has.shape, dtype=np.int64)
        return np.where(has, self.items[at], 0), np.where(has, self.levels[at], 0)


class StageNegativeSampler(UniformNegativeSampler):
    """Training negatives of which ``stage`` per target come from the target's own request's
    stage samples (the items the funnel filtered out of it: same user, same time; drawn
    uniformly, with replacement, among them), the rest uniform as
    :meth:`UniformNegativeSampler.for_training`. A target whose request has no stage sample
    gets uniform negatives only. A request's candidate may be an item the user consumed in
    another request (a false negative); RecFlow's baseline keeps it, ``unseen_only`` replaces
    such picks by their uniform draw. ``min_stage`` (1..4) keeps only samples that reached at
    least that stage (1 = all; 4 = only those cut at re-ranking, the hardest).

    :meth:`sample_stage` serves CTR training: stage samples only, with their levels (no
    uniform fill), as extra non-clicks of the impression's request.
    """

    def __init__(self, split: SplitData, *, seed: int, stage: int, min_stage: int = 1, unseen_only: bool = False) -> None:
        super().__init__(split, seed=seed, exclude_parts=(TRAIN,))
        self.index = StageIndex(split, min_stage=min_stage)
        if stage < 1:
            raise ConfigError(f"stage-negatives must be >= 1 (got {stage})")
        self.stage = int(stage)
        self.unseen_only = bool(unseen_only)

    def _pick(self, users: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(has, picks, seen)``: which rows' requests have stage samples, ``k`` positions
        (in the index) drawn uniformly with replacement for each of them, and whether each
        pick is an item the user consumed in training (only computed with ``unseen_only``)."""
        lo, hi = self.index.requests(np.asarray(rows, dtype=np.int64))
        size = hi - lo
        has = size > 0
        pick = lo[has, None] + (self.rng.random((int(has.sum()), k)) * size[has, None]).astype(np.int64)
        seen = np.zeros(pick.shape, dtype=bool)
        if self.unseen_only and pick.size:
            users_h = np.repeat(np.asarray(users, dtype=np.int64)[has], k)
            seen = self._seen(users_h, self.index.items[pick].reshape(-1)).reshape(pick.shape)
        return has, pick, seen

    def sample_rows(self, users: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
        """``(len(rows), n)`` negatives for target ``rows`` (split row indices, -1 = none):
        the first ``min(stage, n)`` columns from each row's request's stage samples (uniform
        where it has none), the rest uniform."""
        out = self.sample(users, n)
        k = min(self.stage, n)
        if k == 0 or len(rows) == 0:
            return out
        has, pick, seen = self._pick(users, rows, k)
        if has.any():
            chosen = self.index.items[pick]  # (H, k)
            # a candidate filtered here but consumed in another training request is no
            # negative of the user's (unseen_only): it keeps its uniform draw
            out[has, :k] = np.where(seen, out[has, :k], chosen)
        return out

    def sample_stage(self, users: np.ndarray, rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(items, levels)``, each ``(len(rows), n)``: ``n`` of each row's request's stage
        samples (uniform with replacement) and the stage each reached (1..4); item 0 and
        level 0 where the request has none (and, with ``unseen_only``, for a pick the user
        consumed in training)."""
        items = np.zeros((len(rows), n), dtype=np.int64)
        levels = np.zeros((len(rows), n), dtype=np.int64)
        if n == 0 or len(rows) == 0:
            return items, levels
        has, pick, seen = self._pick(users, rows, n)
        if has.any():
            items[has] = np.where(seen, 0, self.index.items[pick])
            levels[has] = np.where(seen, 0, self.index.levels[pick])
        return items, levels


class FixedNegatives:
    """Fixed sampled-ranking negatives per user, read from a file.

    The file has one line per user: ``user_id neg_1 ... neg_N`` (whitespace-separated raw
    ids, as in S3-Rec's ``LastFM_sample.txt``); every line must list the same number ``N``
    of distinct items, each a known item the user never interacted with (in any split).
    Users without a line may exist; asking for their negatives is an error.

    :meth:`sample` returns each user's ``N`` negatives in file order, so valid and test are
    ranked against the same candidates, as in S3-Rec's evaluation.
    """

    def __init__(self, path: str | Path, split: SplitData) -> None:
        self.path = resolve_file(path)
        self.split = split
        users = {str(raw): i for i, raw in enumerate(split.user_raw) if i > 0}
        items = {str(raw): i for i, raw in enumerate(split.item_raw) if i > 0}
        seen = split.seen_pairs((TRAIN, VALID, TEST))
        stride = split.n_items + 1
        table: np.ndarray | None = None
        for number, line in iter_lines(self.path):
            fields = line.split()
            if fields[0] not in users:
                raise DataError("unknown user id", file=self.path, row=number, column="user", value=fields[0])
            user = users[fields[0]]
            if len(fields) < 2:
                raise DataError("no negatives on this line", file=self.path, row=number)
            if table is None:
                table = np.zeros((split.n_users + 1, len(fields) - 1), dtype=np.int64)
            elif len(fields) - 1 != table.shape[1]:
                raise DataError(f"{len(fields) - 1} negatives, the first line has {table.shape[1]}",
                                file=self.path, row=number)
            if table[user].any():
                raise DataError("second line for this user", file=self.path, row=number, column="user", value=fields[0])
            for field in fields[1:]:
                if field not in items:
                    raise DataError("unknown item id", file=self.path, row=number, column="negative", value=field)
            row = np.array([items[f] for f in fields[1:]], dtype=np.int64)
            if np.unique(row).size != row.size:
                raise DataError("repeated negative item", file=self.path, row=number)
            keys = user * stride + row
            pos = np.minimum(np.searchsorted(seen, keys), max(len(seen) - 1, 0))
            hit = (seen[pos] == keys) if len(seen) else np.zeros(len(keys), dtype=bool)
            if hit.any():
                raise DataError("negative item is one the user interacted with", file=self.path, row=number,
                                column="negative", value=fields[1 + int(np.flatnonzero(hit)[0])])
            table[user] = row
        if table is None:
            raise DataError("no negatives in this file", file=self.path)
        self.table = table
        self.n = table.shape[1]
        self.has_line = table[:, 0] > 0

    def require(self, users: np.ndarray) -> None:
        """Raise unless every one of ``users`` (indices) has a line in the file."""
        users = np.asarray(users, dtype=np.int64)
        missing = users[~self.has_line[users]]
        if missing.size:
            raise DataError(f"no negatives for user {int(self.split.user_raw[missing[0]])} "
                            f"({np.unique(missing).size} users without a line)", file=self.path)

    def sample(self, users: np.ndarray, n: int, domains: np.ndarray | None = None) -> np.ndarray:
        """``(len(users), n)``: each user's fixed negatives (``n`` must be the file's ``N``)."""
        users = np.asarray(users, dtype=np.int64)
        if n != self.n:
            raise ConfigError(f"{self.path}: holds {self.n} negatives per user, the protocol needs {n}")
        self.require(users)
        return self.table[users].copy()
