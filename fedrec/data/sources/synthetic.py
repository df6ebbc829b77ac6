"""``synthetic:key=value,...`` — the embedded default data: users drawn from latent groups.

No file needed; seeded, so the same spec gives the same data. The generative process:

1. ``groups`` latent groups, each with a taste vector ``theta_g ~ N(0, I_dim)``; every user
   gets a group ``z_u`` uniformly at random and a taste
   ``w_u = sqrt(group_weight) * theta_{z_u} + sqrt(1 - group_weight) * eps_u``,
   ``eps_u ~ N(0, I_dim)`` — a group-level taste plus an individual one.
2. ``items`` items, each with a ``category`` (one of ``categories``, uniform) and a latent
   vector ``v_i = mu_{category} + 0.5 * noise`` (``mu_c ~ N(0, I_dim)``); a ``brand`` code
   (uniform over 50) and a Zipf popularity ``pop_i ∝ 1 / rank^0.8`` (random ranks).
3. Each user sees ``L_u ~ Uniform{min_len..max_len}`` impressions at increasing times
   (exponential gaps). An impression is, with probability ``explore``, drawn from the
   popularity distribution, otherwise picked from 20 popularity-drawn candidates by a
   softmax over ``w_u . v_i`` — the feed is already personalised, as in real logs.
4. Clicks: ``P(click) = sigmoid(sharpness * w_u . v_i / sqrt(dim) + b_u)``, with a user
   click propensity ``b_u ~ N(0, 0.5^2)``. Every impression keeps its 0/1 label.
5. User profile: ``segment`` equals the user's group with probability ``profile_signal``
   (else a random group), plus an uninformative ``age`` band (1..6). Item features:
   ``category``, ``brand``. All codes start at 1 (0 = padding).

The true group of every user is kept (:attr:`Dataset.user_groups`) to score group discovery.

Multi-domain variant (``domains=2`` or more): each domain has its own ``items`` items (and
category means); a user's taste is shared across domains, so interactions in one domain
carry information about another. A fraction ``overlap`` of users is active in every domain;
the rest are active in one domain each. Rows carry ``domain`` (``d0``, ``d1``, ...).
``domain_ratio`` scales the sequence lengths of every domain after the first (e.g. 9: a
live-stream-like ``d0`` beside a short-video-like ``d1`` with nine times its exposures, as in
Moment&Cross); the rows of ``d0`` are those without it.

Second behaviour (``behaviours=2``): every row also gets a ``rating`` 1..5, a behaviour that
follows the click taste only in part: a second taste ``w2_u = sqrt(0.5) * w_u + sqrt(0.5) *
eps2_u`` and an item quality ``q_i ~ N(0, 0.7^2)``, ``rating = clip(round(2.7 + 1.5 * w2_u . v_i
/ sqrt(dim) + q_i + N(0, 0.5^2)), 1, 5)``; a rating of 4 or more is a "like" (the
multi-behaviour head of UniCDR+, :data:`fedrec.data.batching.LIKE_THRESHOLD`). Drawn from a
stream of its own, so the rest of the data is the same as with ``behaviours=1``.

Live-stream moments (``moments=K``, K >= 1): the click rate is no longer stationary in time.
Every item gets ``K`` highlight moments, each ``moment_length`` long (in the data's time
unit, seconds; default 3600) and starting at a time drawn uniformly over the span of its
domain's impressions (``[first time, last time]``; moments of one item may overlap, a late
one may run past the end). While an item is in a moment, its clicks follow
``P(click) = sigmoid(sharpness * w_u . v_i / sqrt(dim) + b_u + moment_lift)`` (a logit shift,
default 2.0): a stream's CTR rises during its "highlight moments" (Moment&Cross), so a model
that learns from recent clicks gains. The moments are drawn from a stream of their own and
the click draws are the same uniforms, so the exposures, times and every other column are
those of the data without moments, and a click without moments stays a click (the lift only
adds clicks). The moments are kept in ``Dataset.meta["moment_windows"]`` (a frame of
``item``, ``start``, ``end``: an impression at ``time`` is in a moment when ``start <= time <
end``). ``moment_lift`` and ``moment_length`` are refused without ``moments``.

``kind=recflow`` generates a recommender funnel with RecFlow's columns instead (exposures,
watch times and the stage samples each request filtered out; its options are in
:mod:`fedrec.data.sources.recflow`).

Options (defaults): ``users=2000, items=1000, groups=4, categories=20, dim=16,
group_weight=0.8, min_len=10, max_len=60, explore=0.3, sharpness=3.0, profile_signal=0.5,
domains=1, overlap=1.0, domain_ratio=1, behaviours=1, moments=0, moment_lift=2.0,
moment_length=3600, seed=0``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedrec.data.interactions import Dataset, Interactions
from fedrec.data.sources import SOURCES
from fedrec.data.spec import Options, SourceSpec
from fedrec.errors import SpecError

_CANDIDATES = 20
_BRANDS = 50


@SOURCES.register("synthetic")
def load_synthetic(spec: SourceSpec, options: Options) -> Dataset:
    """Generate the synthetic grouped-users data (see the module docstring for options);
    ``kind=recflow`` generates a RecFlow funnel instead (:mod:`fedrec.data.sources.recflow`)."""
    if options.choice("kind", ("groups", "recflow"), "groups") == "recflow":
        return _load_recflow(spec, options)
    p = dict(
        users=options.int("users", 2000, minimum=1),
        items=options.int("items", 1000, minimum=2),
        groups=options.int("groups", 4, minimum=1),
        categories=options.int("categories", 20, minimum=1),
        dim=options.int("dim", 16, minimum=1),
        group_weight=options.float("group_weight", 0.8, minimum=0.0, maximum=1.0),
        min_len=options.int("min_len", 10, minimum=1),
        max_len=options.int("max_len", 60, minimum=1),
        explore=options.float("explore", 0.3, minimum=0.0, maximum=1.0),
        sharpness=options.float("sharpness", 3.0, minimum=0.0),
        profile_signal=options.float("profile_signal", 0.5, minimum=0.0, maximum=1.0),
        domains=options.int("domains", 1, minimum=1),
        domain_ratio=options.float("domain_ratio", 1.0, minimum=0.01),
        overlap=options.float("overlap", 1.0, minimum=0.0, maximum=1.0),
        behaviours=int(options.choice("behaviours", ("1", "2"), "1")),
        moments=options.int("moments", 0, minimum=0),
        seed=options.int("seed", 0),
    )
    for key in ("moment_lift", "moment_length"):
        if options.has(key) and p["moments"] == 0:
            raise SpecError(f"{spec.text}: option '{key}' needs moments >= 1 (moments per item; got moments=0)")
    lift = options.float("moment_lift", 2.0)
    length = options.float("moment_length", 3600.0)
    options.finish()
    if p["max_len"] < p["min_len"]:
        raise SpecError(f"{spec.text}: max_len ({p['max_len']}) must be >= min_len ({p['min_len']})")
    if p["moments"]:
        if not (np.isfinite(lift) and lift > 0):
            raise SpecError(f"{spec.text}: option 'moment_lift' must be a positive finite number (got {lift:g})")
        if not (np.isfinite(length) and length > 0):
            raise SpecError(f"{spec.text}: option 'moment_length' must be a positive finite number (got {length:g})")
        p.update(moment_lift=lift, moment_length=length)
    return generate(name=spec.text, **p)


def _load_recflow(spec: SourceSpec, options: Options) -> Dataset:
    from fedrec.data.sources.recflow import generate_recflow, recflow_dataset

    p = dict(
        users=options.int("users", 300, minimum=1),
        items=options.int("items", 500, minimum=2),
        requests=options.int("requests", 20, minimum=1),
        candidates=options.int("candidates", 60, minimum=2),
        groups=options.int("groups", 4, minimum=1),
        dim=options.int("dim", 16, minimum=1),
        group_weight=options.float("group_weight", 0.8, minimum=0.0, maximum=1.0),
        sharpness=options.float("sharpness", 3.0, minimum=0.0),
        system_noise=options.float("system_noise", 1.0, minimum=0.0),
        watch_offset=options.float("watch_offset", 1.5),
        seed=options.int("seed", 0),
    )
    label = options.str("label", "effective_view")
    options.finish()
    if p["items"] < p["candidates"]:
        raise SpecError(f"{spec.text}: items ({p['items']}) must be >= candidates ({p['candidates']})")
    realshow, all_stage = generate_recflow(**p)
    dataset = recflow_dataset(realshow, all_stage, name=spec.text, label=label)
    dataset.meta["params"] = {"kind": "recflow", **p}
    return dataset


#: rows per block of the per-impression products: memory stays O(block x candidates x dim)
#: instead of O(impressions x candidates x dim) (25 GB at 1M users of 10 impressions)
_BLOCK = 1 << 16


def _blocked(fn, n: int) -> np.ndarray:
    """``fn(slice)`` over blocks of ``n`` rows, concatenated: the same numbers as one call
    (each row's product is computed alone), without its temporaries for all rows at once."""
    if n <= _BLOCK:
        return fn(slice(0, n))
    return np.concatenate([fn(slice(i, min(n, i + _BLOCK))) for i in range(0, n, _BLOCK)])


def generate(
    *,
    name: str = "synthetic:",
    users: int = 2000,
    items: int = 1000,
    groups: int = 4,
    categories: int = 20,
    dim: int = 16,
    group_weight: float = 0.8,
    min_len: int = 10,
    max_len: int = 60,
    explore: float = 0.3,
    sharpness: float = 3.0,
    profile_signal: float = 0.5,
    domains: int = 1,
    overlap: float = 1.0,
    domain_ratio: float = 1.0,
    behaviours: int = 1,
    moments: int = 0,
    moment_lift: float = 2.0,
    moment_length: float = 3600.0,
    seed: int = 0,
) -> Dataset:
    """Generate a synthetic :class:`Dataset` (parameters as in the module docstring)."""
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((groups, dim))
    group = rng.integers(groups, size=users)
    taste = np.sqrt(group_weight) * theta[group] + np.sqrt(1.0 - group_weight) * rng.standard_normal((users, dim))
    propensity = 0.5 * rng.standard_normal(users)
    # the second behaviour: its own stream, so behaviours=1 data is unchanged
    rng2 = np.random.default_rng([seed, 2])
    taste2 = np.sqrt(0.5) * taste + np.sqrt(0.5) * rng2.standard_normal((users, dim))
    # the moments: a stream of their own too, so moments=0 data is unchanged
    rng3 = np.random.default_rng([seed, 3])

    # which users are active in which domain
    active = np.ones((users, domains), dtype=bool)
    if domains > 1:
        single = rng.random(users) >= overlap
        home = rng.integers(domains, size=users)
        active[single] = False
        active[single, home[single]] = True

    frames = []
    item_tables = []
    moment_tables = []
    for d in range(domains):
        # per-domain catalogue
        category = rng.integers(categories, size=items)
        mu = rng.standard_normal((categories, dim))
        vec = mu[category] + 0.5 * rng.standard_normal((items, dim))
        brand = rng.integers(_BRANDS, size=items)
        ranks = rng.permutation(items) + 1
        pop = 1.0 / ranks**0.8
        pop /= pop.sum()

        who = np.flatnonzero(active[:, d])
        lengths = rng.integers(min_len, max_len + 1, size=who.size)
        if d > 0 and domain_ratio != 1.0:  # e.g. short videos: 9x the exposures of live streams
            lengths = np.maximum(1, np.round(lengths * domain_ratio)).astype(lengths.dtype)
        uid = np.repeat(who, lengths)
        n = uid.size
        # exposures: popularity draws, or a preference pick among popularity candidates
        cand = rng.choice(items, size=(n, _CANDIDATES), p=pop)
        draw = rng.random((n, 1))  # the next draws of the stream (the softmax below takes none)

        def pick_block(b: slice) -> np.ndarray:  # a softmax pick per row: row by row, in blocks
            logits = np.einsum("nd,nkd->nk", taste[uid[b]], vec[cand[b]]) / np.sqrt(dim)
            logits -= logits.max(axis=1, keepdims=True)
            prob = np.exp(logits)
            prob /= prob.sum(axis=1, keepdims=True)
            return (prob.cumsum(axis=1) < draw[b]).sum(axis=1).clip(max=_CANDIDATES - 1)

        pick = _blocked(pick_block, n)
        chosen = cand[np.arange(n), pick]
        explore_mask = rng.random(n) < explore
        chosen[explore_mask] = cand[explore_mask, 0]
        affinity = _blocked(lambda b: np.einsum("nd,nd->n", taste[uid[b]], vec[chosen[b]]), n) / np.sqrt(dim)
        uniform = rng.random(n)  # the click draws (compared below, once the times are known)
        gaps = rng.exponential(600.0, size=n).round().astype(np.int64) + 1
        first = np.cumsum(lengths) - lengths
        cum = np.cumsum(gaps)
        # per-user clock: the user's own cumulative gaps after a common start
        time = 1_700_000_000 + cum - np.repeat((cum - gaps)[first], lengths)
        logit = sharpness * affinity + propensity[uid]
        if moments:
            start, inside = _moments(rng3, chosen, time, items, moments, moment_length)
            logit = logit + moment_lift * inside
            moment_tables.append(pd.DataFrame({"item": np.repeat(np.arange(items) + 1 + d * items, moments),
                                               "start": start.ravel(), "end": start.ravel() + moment_length}))
        click = uniform < 1.0 / (1.0 + np.exp(-logit))
        frame = pd.DataFrame({"user": uid + 1, "item": chosen + 1 + d * items, "time": time, "label": click.astype(np.int8)})
        if behaviours > 1:
            quality = 0.7 * rng2.standard_normal(items)
            aff2 = _blocked(lambda b: np.einsum("nd,nd->n", taste2[uid[b]], vec[chosen[b]]), n) / np.sqrt(dim)
            raw = 2.7 + 1.5 * aff2 + quality[chosen] + 0.5 * rng2.standard_normal(n)
            frame["rating"] = np.clip(np.round(raw), 1, 5).astype(np.float64)
        if domains > 1:
            frame["domain"] = f"d{d}"
        frames.append(frame)
        item_tables.append(
            pd.DataFrame(
                {"category": category + 1, "brand": brand + 1},
                index=pd.Index(np.arange(items) + 1 + d * items, name="item"),
            )
        )
    table = pd.concat(frames, ignore_index=True)
    segment = np.where(rng.random(users) < profile_signal, group, rng.integers(groups, size=users))
    user_features = pd.DataFrame(
        {"segment": segment + 1, "age": rng.integers(6, size=users) + 1},
        index=pd.Index(np.arange(users) + 1, name="user"),
    )
    present = np.unique(table["user"].to_numpy())
    extra: dict = {}
    if moments:
        extra = {"params": dict(moments=moments, moment_lift=moment_lift, moment_length=moment_length),
                 "moment_windows": pd.concat(moment_tables, ignore_index=True)}
    dataset = Dataset(
        name=name,
        interactions=Interactions.from_frame(table, source=name),
        user_features=user_features.loc[present],
        item_features=pd.concat(item_tables),
        user_groups=pd.Series(group + 1, index=pd.Index(np.arange(users) + 1, name="user"), name="group").loc[present],
        meta={
            "format": "synthetic",
            "time_unit": "s",
            "params": dict(users=users, items=items, groups=groups, categories=categories, dim=dim,
                           group_weight=group_weight, min_len=min_len, max_len=max_len, explore=explore,
                           sharpness=sharpness, profile_signal=profile_signal, domains=domains,
                           overlap=overlap, domain_ratio=domain_ratio, behaviours=behaviours, seed=seed),
        },
    )
    if extra:  # recorded only with moments: the meta of data without them is unchanged
        dataset.meta["params"].update(extra["params"])
        dataset.meta["moment_windows"] = extra["moment_windows"]
    return dataset


def in_moments(dataset: Dataset) -> np.ndarray:
    """Whether each row of ``dataset.interactions.frame`` falls in one of its item's moments
    (``moments=K`` data, from ``meta["moment_windows"]``); a :class:`SpecError` on data
    without moments."""
    windows = dataset.meta.get("moment_windows")
    if windows is None:
        raise SpecError(f"{dataset.name}: the data has no moments (synthetic:...,moments=K)")
    frame = dataset.interactions.frame
    order = np.argsort(windows["item"].to_numpy(), kind="stable")
    w_item, w_start, w_end = (windows[c].to_numpy()[order] for c in ("item", "start", "end"))
    item, time = frame["item"].to_numpy(), frame["time"].to_numpy().astype(np.float64)
    lo, hi = np.searchsorted(w_item, item, "left"), np.searchsorted(w_item, item, "right")
    inside = np.zeros(len(frame), dtype=bool)
    for k in range(int((hi - lo).max(initial=0))):  # the k-th moment of each row's item
        has = lo + k < hi
        j = np.minimum(lo + k, len(w_item) - 1)
        inside |= has & (time >= w_start[j]) & (time < w_end[j])
    return inside


def _moments(rng: np.random.Generator, chosen: np.ndarray, time: np.ndarray, items: int, moments: int,
             length: float) -> tuple[np.ndarray, np.ndarray]:
    """The ``(items, moments)`` start times of every item's moments, drawn uniformly over
    ``[time.min(), time.max()]``, and whether each impression (item ``chosen`` at ``time``)
    falls in one of its item's moments (``start <= time < start + length``)."""
    lo, hi = float(time.min()), float(time.max())
    start = lo + rng.random((items, moments)) * (hi - lo)

    def inside(b: slice) -> np.ndarray:
        s = start[chosen[b]]  # (block, moments)
        t = time[b, None]
        return ((t >= s) & (t < s + length)).any(axis=1)

    return start, _blocked(inside, len(time))
