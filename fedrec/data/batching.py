"""Tasks and batching: from :class:`~fedrec.data.split.SplitData` to padded tensors.

Three tasks, all producing ``(B, T)`` tensors with **0 as padding** (sequences are
left-padded, so the most recent interaction is always in the last column):

``ctr``
    Each position's next impression and its label. Training: for each user, the last
    ``max_len + 1`` training impressions; ``items[:, t]`` (and, optionally for the model,
    ``labels[:, t]``) is the history token, ``target_items[:, t]`` / ``target_labels[:, t]``
    the impression that follows it, ``target_mask`` marks real targets. Evaluation: the
    history is all earlier-split interactions (train for valid; train + valid for test) and
    only the last position carries a target — the held-out impression.
``next_item``
    The same windows over the user's **positive** interactions (on CTR logs with real 0/1
    labels, non-clicks are neither targets nor history); training adds ``negatives``
    ``(B, T, n_neg)`` from the given sampler (the trainers use
    :meth:`~fedrec.data.samplers.UniformNegativeSampler.for_training`: uniform among items
    the user did not interact with in training, with replacement); evaluation adds
    ``candidates`` ``(B, 1 + N)`` (column 0 the held-out item, then ``N`` distinct items the
    user never interacted with in any split; drawn once per example set from the sampler's
    seed, so every model and batch size sees the same negatives) for sampled ranking, or
    nothing for full ranking (use :meth:`ExampleSet.exclusions` for the items to exclude).
    Users whose held-out interaction is a non-click have no evaluation example at that
    stage (see :func:`evaluation_population`).
``cdr``
    One example per (user, domain, positive item) with ``negatives`` ``(B, n_neg)`` from the
    same domain, an own-domain context ``own_items`` ``(B, T)`` (a random subset of the
    user's other training items in that domain, never the positive item) and an
    other-domain context ``other_items`` ``(B, T)`` (a random subset of the user's training
    items in the other domains). Contexts are subsets in time order (the domains one after
    the other in ``other_items``), padded with 0 on the right, re-drawn each time a batch is
    built (UniCDR's interaction masking). On data with a ``rating`` column the batches also
    carry ``target_ratings`` ``(B,)`` (the positive's rating, NaN where it has none): the
    second behaviour (:data:`LIKE_THRESHOLD`) of the multi-behaviour head and metrics.

Per-row values: on data with a ``rating`` (``value``) column, ``ctr`` and ``next_item``
batches also carry ``ratings`` / ``target_ratings`` (``values`` / ``target_values``)
``(B, T)`` float tensors, the history's and the targets' values (NaN on padding): CRM's
condition. They also carry ``target_times`` ``(B, T)`` (float64, NaN on padding): the
targets' times (Moment&Cross's cross-domain search reads only what came before).

Evaluation histories: see :func:`history_parts` (on the files' own split, training rows
only). :meth:`ExampleSet.subset` restricts examples to a client's users.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import numbers

import numpy as np
import torch

from fedrec.data.samplers import FixedNegatives, UniformNegativeSampler
from fedrec.data.split import TEST, TRAIN, VALID, SplitData
from fedrec.errors import ConfigError

__all__ = ["TASKS", "STAGES", "LIKE_THRESHOLD", "NO_LABELS", "ExampleSet", "build_examples", "check_task",
           "evaluation_population", "history_parts", "iterate_batches", "target_groups"]

TASKS = ("ctr", "next_item", "cdr")
#: on data with ratings, an interaction whose rating is at least this is the second
#: behaviour ("like", on the usual 1-5 scale) of cross-domain multi-behaviour training and
#: of the ``DOMAIN/like/...`` metrics
LIKE_THRESHOLD = 4.0
STAGES = ("train", "valid", "test")
_STAGE_PART = {"train": TRAIN, "valid": VALID, "test": TEST}


@dataclass
class ExampleSet:
    """The examples of one task and stage, as numpy arrays (one row per example).

    ``rows`` are indices into the split's row arrays; -1 marks padding. For ``ctr`` and
    ``next_item``: ``input_rows`` ``(N, T)`` and ``target_rows`` ``(N, T)``; for ``cdr``:
    ``target_rows`` ``(N, 1)`` (the positive) and ``input_rows`` empty (contexts are drawn
    per batch).
    """

    task: str
    stage: str
    split: SplitData
    seq: np.ndarray
    input_rows: np.ndarray
    target_rows: np.ndarray
    max_len: int

    def __len__(self) -> int:
        return len(self.seq)

    @property
    def users(self) -> np.ndarray:
        """User index of every example."""
        return self.split.seq_user[self.seq]

    @property
    def domains(self) -> np.ndarray:
        """Domain index of every example (-1 on single-domain data)."""
        return self.split.seq_domain[self.seq]

    def subset(self, users: np.ndarray) -> "ExampleSet":
        """The examples of the given user indices only (a client's shard)."""
        keep = np.isin(self.users, np.asarray(users))
        return replace(self, seq=self.seq[keep], input_rows=self.input_rows[keep], target_rows=self.target_rows[keep])

    def candidates(self, n: int, *, seed: int, fixed: FixedNegatives | None = None) -> np.ndarray:
        """``(N, 1 + n)`` sampled-ranking candidates: column 0 the held-out item, then ``n``
        distinct uniform items the user never interacted with in any split (so never the
        held-out item), within the item's domain (or each user's ``fixed`` negatives, when
        given). A user with fewer than ``n`` such items is a
        :class:`~fedrec.errors.DataError` naming the user.

        Drawn from ``seed`` alone, so every model and batch size is scored on the same
        negatives (the same seed gives the same candidates for the same examples).
        """
        sp = self.split
        domains = self.domains if sp.domains else None
        targets = _take(sp.item, self.target_rows[:, -1])
        if fixed is not None:
            negatives = fixed.sample(self.users, n, domains=domains)
            return np.concatenate([targets[:, None], negatives], axis=1)

        def draw() -> np.ndarray:
            sampler = UniformNegativeSampler(sp, seed=seed, exclude_parts=(TRAIN, VALID, TEST))
            negatives = sampler.sample(self.users, n, domains=domains, distinct=True)
            out = np.concatenate([targets[:, None], negatives], axis=1)
            out.flags.writeable = False  # kept on the split: callers index it, never write to it
            return out

        # drawn once per example set and kept on the split (every evaluation of a run reads the
        # same candidates; N x (1 + n) int64, read-only)
        import hashlib

        digest = hashlib.blake2b(np.ascontiguousarray(self.target_rows[:, -1]).tobytes(), digest_size=16).hexdigest()
        return sp.cached(("candidates-of", self.task, self.stage, n, int(seed), digest), draw)

    def exclusions(self) -> tuple[np.ndarray, np.ndarray]:
        """CSR ``(indptr, indices)`` of the items in each example's history splits (see
        :func:`history_parts`; empty for training examples) — the candidates that
        full-ranking evaluation must exclude."""
        sp = self.split
        keys = sp.seen_pairs(history_parts(sp, self.stage))
        k_user, k_item = keys // (sp.n_items + 1), keys % (sp.n_items + 1)
        starts = np.searchsorted(k_user, self.users, side="left")
        ends = np.searchsorted(k_user, self.users, side="right")
        lengths = ends - starts
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        idx = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
        items = k_item[idx]
        if target_groups(self) is not None:
            # a ratio split holds several items out per user: those that also occur in the
            # history stay rankable (RecBole's history_item = used_item - positive_item), so
            # every held-out item of a user is ranked in the same one list
            width = sp.n_items + 1
            users = np.asarray(self.users, dtype=np.int64)
            held = np.unique(users * width + sp.item[self.target_rows[:, -1]])
            owner = np.repeat(np.arange(len(self)), lengths)
            keep = ~np.isin(users[owner] * width + items, held)
            items = items[keep]
            indptr = np.concatenate([[0], np.cumsum(np.bincount(owner[keep], minlength=len(self)))]).astype(np.int64)
        return indptr, items


def _last_rows(rows: np.ndarray, group: np.ndarray, n_groups: int, width: int, skip_last: int = 0) -> np.ndarray:
    """``(n_groups, width)`` matrix of the last ``width`` rows of each group, left-padded
    with -1, ignoring each group's last ``skip_last`` rows. ``rows`` sorted by (group, time)."""
    out = np.full((n_groups, width), -1, dtype=np.int64)
    if rows.size == 0:
        return out
    counts = np.bincount(group, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(rows.size) - starts[group]
    from_end = counts[group] - 1 - rank - skip_last
    keep = (from_end >= 0) & (from_end < width)
    out[group[keep], width - 1 - from_end[keep]] = rows[keep]
    return out


#: why CTR cannot run on implicit feedback, and what to do instead (one line)
NO_LABELS = ("task 'ctr' needs 0/1 click labels, but this data has none (implicit feedback: every interaction is a "
             "positive, so AUC is undefined): use --task next_item, or data with a 0/1 label column, or add "
             "ctr_negatives=K to the data spec (K sampled non-clicks per interaction, for data with its own "
             "train/valid/test split)")


def check_task(split: SplitData, task: str) -> None:
    """Refuse a task the data cannot support, before anything trains: ``ctr`` on data
    without click labels (:data:`NO_LABELS`), ``cdr`` on single-domain data. Raises
    :class:`~fedrec.errors.ConfigError`."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    if task == "ctr" and not split.has_labels:
        raise ConfigError(NO_LABELS)
    if task == "cdr" and not split.domains:
        raise ConfigError("task 'cdr' needs multi-domain data (rows with a domain)")


def build_examples(split: SplitData, *, task: str, stage: str, max_len: int) -> ExampleSet:
    """Build the :class:`ExampleSet` of ``task`` at ``stage`` with histories of ``max_len``.

    Builds ``ctr`` examples on implicit feedback too (every label 1); the trainers refuse
    that task there with :func:`check_task` before anything trains."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
    if not isinstance(max_len, numbers.Integral) or isinstance(max_len, bool) or max_len < 1:
        raise ConfigError(f"max_len must be a positive integer (got {max_len!r})")
    max_len = int(max_len)
    if task == "cdr" and not split.domains:
        raise ConfigError("task 'cdr' needs multi-domain data (rows with a domain)")
    part = _STAGE_PART[stage]
    row_seq = split.row_seq
    n_seq = split.n_sequences
    # next_item / cdr learn from positives: on CTR logs (real 0/1 labels) non-clicks are
    # neither targets nor history items
    usable = np.ones(len(split.part), dtype=bool)
    if task != "ctr" and split.has_labels:
        usable = split.label == 1

    if task == "cdr":
        targets = np.flatnonzero((split.part == part) & usable)
        return ExampleSet(task, stage, split, row_seq[targets], np.zeros((len(targets), 0), dtype=np.int64),
                          targets[:, None], max_len)

    if stage == "train":
        rows = np.flatnonzero((split.part == TRAIN) & usable)
        group = row_seq[rows]
        tgt = _last_rows(rows, group, n_seq, max_len)
        inp = _last_rows(rows, group, n_seq, max_len, skip_last=1)
        has = (tgt[:, -1] >= 0) & (inp[:, -1] >= 0)  # at least two training rows
        # a target without an input before it is not a training target
        tgt = np.where(inp >= 0, tgt, -1)
        seqs = np.flatnonzero(has)
        return ExampleSet(task, stage, split, seqs, inp[seqs], tgt[seqs], max_len)

    hist_rows = np.flatnonzero(np.isin(split.part, history_parts(split, stage)) & usable)
    hist = _last_rows(hist_rows, row_seq[hist_rows], n_seq, max_len)
    targets = np.flatnonzero((split.part == part) & usable)
    seqs = row_seq[targets]
    tgt = np.full((len(targets), max_len), -1, dtype=np.int64)
    tgt[:, -1] = targets
    return ExampleSet(task, stage, split, seqs, hist[seqs], tgt, max_len)


def evaluation_population(split: SplitData, task: str, examples: dict[str, ExampleSet]) -> dict:
    """Who is evaluated, to be stated next to the numbers: ``rule`` (which interactions
    count and which users have an example), ``users`` (the split's users) and, per stage of
    ``examples`` (valid/test example sets by stage), its ``examples`` and ``users``.

    On labelled data (e.g. ``movielens:`` with its default ``threshold=4``) next item uses
    positives only, so a user whose held-out interaction is a non-click (a rating below the
    threshold) is not evaluated at that stage; ``movielens:PATH?implicit=true`` (every rating
    a positive) evaluates every user on its last interaction.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    if split.method == "files":
        held_out = "the files' own valid/test rows"
    elif split.method == "ratio":
        held_out = "a time-ordered ratio split's valid and test rows, several per user; full ranking scores each " \
                   "user once, on the set of its held-out items"
    else:
        held_out = "each user's second-to-last (valid) and last (test) interaction by time"
    if task == "ctr":
        rule = f"every held-out impression, clicked or not ({held_out})"
    elif not split.has_labels:
        rule = f"every interaction is a positive; every user with a held-out interaction ({held_out}) is evaluated"
    else:
        what = "held-out target" if task == "next_item" else "held-out row"
        rule = (f"positives only (label 1: history and targets); a user is evaluated at a stage only when its "
                f"{what} there ({held_out}) is a positive")
    out: dict = {"rule": rule, "users": int(split.n_users)}
    for stage, ex in examples.items():
        out[stage] = {"examples": len(ex), "users": int(np.unique(ex.users).size)}
    return out


def target_groups(examples: ExampleSet) -> tuple[np.ndarray, np.ndarray] | None:
    """How next-item evaluation groups the examples of a ratio split (RecBole's convention
    for held-out sets): ``(seq, keep)``, where ``keep`` marks the first example of each
    distinct (sequence, held-out item) pair and ``seq`` is the sequence (user) of each kept
    example; the metrics then treat each user's kept items as one relevant set
    (:func:`~fedrec.metrics.topk_metrics`). Every example of a sequence shares its history,
    so its rank under full ranking is the item's position in the user's one ranked list.

    None for the other split methods: leave-last-two-out has one held-out item per user,
    and the files' own split keeps scoring each held-out row on its own, as before."""
    if examples.split.method != "ratio" or examples.task != "next_item" or len(examples) == 0:
        return None
    sp = examples.split
    key = examples.seq.astype(np.int64) * (sp.n_items + 1) + sp.item[examples.target_rows[:, -1]]
    _, first = np.unique(key, return_index=True)
    keep = np.zeros(len(examples), dtype=bool)
    keep[first] = True
    return examples.seq[keep], keep


def history_parts(split: SplitData, stage: str) -> tuple[int, ...]:
    """The splits whose rows form the history of an evaluation example at ``stage``.

    Leave-last-two-out: train for valid, train + valid for test (the validation item
    precedes the test item in time). The files' own split: train only — in CDR releases
    the validation rows are not earlier interactions (UniCDR even reuses the test file as
    validation), so appending them would leak the answer.
    """
    if stage == "train":
        return ()
    if split.method == "files" or stage == "valid":
        return (TRAIN,)
    return (TRAIN, VALID)


def _take(values: np.ndarray, rows: np.ndarray, fill=0) -> np.ndarray:
    out = values[np.maximum(rows, 0)]
    return np.where(rows >= 0, out, fill)


def _sample_context(
    indptr: np.ndarray,
    groups: np.ndarray,
    width: int,
    rng: np.random.Generator,
    *,
    exclude_row: np.ndarray | None = None,
    exclude_item: np.ndarray | None = None,
    row_item: np.ndarray | None = None,
    exclude_domain: np.ndarray | None = None,
    row_domain: np.ndarray | None = None,
    order: np.ndarray | None = None,
) -> np.ndarray:
    """A random subset (up to ``width``) of each group's rows, as a -1-padded matrix.

    Group ``g``'s rows are ``order[indptr[g]:indptr[g+1]]`` (``order`` defaults to identity).
    """
    sizes = indptr[groups + 1] - indptr[groups]
    longest = int(sizes.max()) if sizes.size else 0
    out = np.full((len(groups), width), -1, dtype=np.int64)
    if longest == 0:
        return out
    pos = np.arange(longest)[None, :]
    rows = indptr[groups][:, None] + pos
    valid = pos < sizes[:, None]
    rows = np.where(valid, rows, 0)
    if order is not None:
        rows = order[rows]
    if exclude_row is not None:
        valid &= rows != exclude_row[:, None]
    if exclude_item is not None:
        valid &= row_item[rows] != exclude_item[:, None]
    if exclude_domain is not None:
        valid &= row_domain[rows] != exclude_domain[:, None]
    keys = np.where(valid, rng.random(valid.shape), np.inf)
    pick = np.argsort(keys, axis=1, kind="stable")[:, :width]
    chosen = np.take_along_axis(rows, pick, axis=1)
    ok = np.take_along_axis(valid, pick, axis=1)
    # the chosen rows in row order (time order within a sequence), padding last, so that a
    # sequential aggregator reads the subset as it happened
    big = np.iinfo(np.int64).max
    chosen = np.sort(np.where(ok, chosen, big), axis=1)
    out[:, : chosen.shape[1]] = np.where(chosen == big, -1, chosen)
    return out


def _cdr_index(sp: SplitData):
    """Training rows grouped by sequence (own-domain contexts) and by user (other-domain)."""
    train_rows = np.flatnonzero(sp.part == TRAIN)  # sorted by sequence already
    train_indptr = np.concatenate([[0], np.cumsum(np.bincount(sp.row_seq[train_rows], minlength=sp.n_sequences))])
    ru = sp.row_user[train_rows]
    user_rows = train_rows[np.argsort(ru, kind="stable")]
    user_indptr = np.concatenate([[0], np.cumsum(np.bincount(ru, minlength=sp.n_users + 1))])
    row_domain = np.repeat(sp.seq_domain, np.diff(sp.indptr))
    return train_rows, train_indptr, user_rows, user_indptr, row_domain


def iterate_batches(
    examples: ExampleSet,
    *,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    num_negatives: int = 0,
    sampler: UniformNegativeSampler | FixedNegatives | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batches of ``examples`` as dicts of tensors (see the module docstring).

    Keys always present: ``user`` (B,), ``domain`` (B,), ``target_items``,
    ``target_labels`` (float), ``target_mask`` (bool); for ``ctr``/``next_item`` also
    ``items`` and ``labels`` (B, T); ``user_features`` (B, F_u) and ``item_features`` are
    looked up by the model from the split (not copied per batch). With ``num_negatives``
    (``next_item`` training: ``(B, T, n)``; evaluation: ``candidates`` ``(B, 1 + n)``;
    ``cdr``: ``negatives`` ``(B, n)`` in training, ``candidates`` ``(B, 1 + n)`` in
    evaluation; ``ctr`` training with a :class:`~fedrec.data.samplers.StageNegativeSampler`:
    ``negatives`` ``(B, T, n)`` from each impression's request's stage samples, item 0 where
    it has none, and their ``negative_levels``) a ``sampler`` is required; evaluation candidates
    come from a :class:`FixedNegatives` sampler as it is, or are drawn from a uniform
    sampler's seed.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
    if num_negatives and sampler is None:
        raise ConfigError("num_negatives > 0 needs a sampler")
    sp = examples.split
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(examples)) if shuffle else np.arange(len(examples))
    candidates = None
    if examples.task == "cdr":
        train_rows, train_indptr, user_rows, user_indptr, row_domain = sp.cached("cdr_context_index", lambda: _cdr_index(sp))
    # computed once, not per batch: each is an O(examples) lookup (quadratic over small batches)
    all_users, all_domains = examples.users, examples.domains
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        tgt = examples.target_rows[idx]
        users = all_users[idx]
        domains = all_domains[idx]
        batch = {
            "user": torch.from_numpy(users),
            "domain": torch.from_numpy(domains),
            "target_items": torch.from_numpy(_take(sp.item, tgt)),
            "target_labels": torch.from_numpy(_take(sp.label, tgt).astype(np.float32)),
            "target_mask": torch.from_numpy(tgt >= 0),
        }
        if examples.task == "cdr":
            own = _sample_context(train_indptr, examples.seq[idx], examples.max_len, rng,
                                  exclude_row=tgt[:, 0], exclude_item=sp.item[tgt[:, 0]], row_item=sp.item,
                                  order=train_rows)
            other = _sample_context(user_indptr, users, examples.max_len, rng, exclude_domain=domains,
                                    row_domain=row_domain, order=user_rows)
            batch["own_items"] = torch.from_numpy(_take(sp.item, own))
            batch["other_items"] = torch.from_numpy(_take(sp.item, other))
            if sp.rating is not None:
                batch["target_ratings"] = torch.from_numpy(_take(sp.rating, tgt[:, 0], fill=np.nan).astype(np.float32))
            if num_negatives and examples.stage == "train":
                batch["negatives"] = torch.from_numpy(sampler.sample(users, num_negatives, domains=domains if sp.domains else None))
            elif num_negatives:
                if candidates is None:
                    fixed = sampler if isinstance(sampler, FixedNegatives) else None
                    candidates = examples.candidates(num_negatives, seed=getattr(sampler, "seed", 0), fixed=fixed)
                batch["candidates"] = torch.from_numpy(candidates[idx])
        else:
            inp = examples.input_rows[idx]
            batch["items"] = torch.from_numpy(_take(sp.item, inp))
            batch["labels"] = torch.from_numpy(_take(sp.label, inp).astype(np.int64))
            # the batch's rows, then float64 (the same values; converting the whole time column
            # first cost O(interactions) per batch)
            batch["target_times"] = torch.from_numpy(np.asarray(_take(sp.time, tgt, fill=np.nan), dtype=np.float64))
            for key, column in (("ratings", sp.rating), ("values", sp.value)):
                if column is not None:  # per-row values of history and targets (NaN = padding)
                    batch[key] = torch.from_numpy(_take(column, inp, fill=np.nan).astype(np.float32))
                    batch["target_" + key] = torch.from_numpy(_take(column, tgt, fill=np.nan).astype(np.float32))
            if num_negatives and examples.task == "ctr":
                # CTR on data with stage samples: extra non-clicks of each impression's own
                # request (stage-aware training), with the stage each reached
                if examples.stage != "train" or not hasattr(sampler, "sample_stage"):
                    raise ConfigError("CTR batches take negatives only in training, from stage samples")
                T = tgt.shape[1]
                neg, lev = sampler.sample_stage(np.repeat(users, T), tgt.reshape(-1), num_negatives)
                valid = (tgt >= 0)[:, :, None]
                batch["negatives"] = torch.from_numpy(neg.reshape(len(idx), T, num_negatives) * valid)
                batch["negative_levels"] = torch.from_numpy(lev.reshape(len(idx), T, num_negatives) * valid)
            elif num_negatives:
                dom = domains if sp.domains else None
                if examples.stage == "train":
                    T = tgt.shape[1]
                    if hasattr(sampler, "sample_rows"):  # stage-aware: from the target's own request
                        neg = sampler.sample_rows(np.repeat(users, T), tgt.reshape(-1), num_negatives)
                    else:
                        neg = sampler.sample(np.repeat(users, T), num_negatives,
                                             domains=None if dom is None else np.repeat(dom, T))
                    neg = neg.reshape(len(idx), T, num_negatives) * (tgt >= 0)[:, :, None]
                    batch["negatives"] = torch.from_numpy(neg)
                else:
                    if candidates is None:
                        fixed = sampler if isinstance(sampler, FixedNegatives) else None
                        candidates = examples.candidates(num_negatives, seed=getattr(sampler, "seed", 0), fixed=fixed)
                    batch["candidates"] = torch.from_numpy(candidates[idx])
        yield batch
