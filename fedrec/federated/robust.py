"""Clients that lie, and aggregation that resists them: attack simulation and robust,
role-aware aggregation.

**Attacks** (run options ``attack``, ``attack-fraction``, ``attack-target``,
``attack-scale``). A fixed set of clients is malicious for the whole run: exactly
``floor(attack-fraction x clients + 0.5)`` of the run's ``shards`` clients (at least one), the first
of a permutation of the client ids drawn from ``seed`` (:func:`malicious_clients`; halves
round up), so every runtime and every node computes the same set; each node must know its
client id (``shard`` in its node config, or Flower's ``partition-id``). What a malicious client does:

``label-flip``
    Trains its users on flipped click labels (every training impression's label ``y``
    becomes ``1 - y``, history and targets; CTR only).
``scale``
    Trains honestly, then boosts its update: it sends ``global + attack-scale x (its mean -
    global)`` for every public parameter and every group it trained (the model-replacement
    attack; ``attack-scale`` 10 by default).
``item-promotion``
    Fake users pushing one target item, the attack the federated-recommendation literature
    studies most (PipAttack, FedRecAttack): the client's users become fake users whose
    profiles copy its real users' histories, and every training target of theirs is the
    target item, clicked (CTR) or consumed next (next item). With ``attack-scale`` != 1 the
    fake users also boost their update as ``scale`` does.
``none``
    The malicious clients behave honestly: the clean control with the same evaluated users.

Malicious clients are left out of evaluation (they reply with summaries of no users), so
with ``attack-fraction`` > 0 the pooled metrics are those of the honest clients' users,
identically with and without the attack. With ``attack-target`` (a raw item id; default: an
item of the catalogue drawn from ``seed``) every evaluation also reports the target's
exposure ``er@K``: the share of the evaluated users who never interacted with the target
whose top-K over the whole catalogue (seen items left out, each user with its own model,
after its whole history) contains it.

**Defences** (``robust``, ``robust-fraction``, ``robust-norm``) replace the weighted mean of
:func:`~fedrec.federated.algorithm.aggregate_uploads`, role by role: the public parameters
are aggregated over the clients' mean public models (one vote per client), each group FFN
over the mean group models of the clients that routed users to it (its members); private
parameters never leave the clients. Inside a client every user still trains its own copy
(the one-client-per-user semantics of shards): a vote is a client, which is a user in a
one-user-per-device deployment.

``median``
    Coordinate-wise median (as Flower's ``FedMedian``).
``trimmed-mean``
    Coordinate-wise mean after cutting ``robust-fraction`` of the votes at each end
    (Flower's ``trim_mean``, as ``FedTrimmedAvg``).
``krum`` / ``multi-krum``
    Krum (Blanchard et al., 2017) keeps the one vote whose ``n - f - 2`` nearest votes are
    closest, Multi-Krum the ``n - f`` best by that score, averaged (Flower's
    ``select_multikrum``); ``f = floor(robust-fraction x clients)``, the malicious clients
    allowed for among all the round's clients (a group's members may include all of them).
    A role with too few votes for the score (``n <= 2f + 2``) falls back to the median.
``norm-bound``
    Each vote's update (``mean - global``) is clipped to the L2 norm ``robust-norm`` over the
    role's parameters (0, the default: the median norm of the round's votes), then the usual
    weighted mean (Sun et al., 2019, "Can you really backdoor federated learning?").

Robust aggregation needs each client's own update: it cannot be combined with secure
aggregation or central DP (which averages clipped models itself), nor with algorithms whose
clients send rows of their own users (UniCDR).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch

from fedrec.errors import ConfigError
from fedrec.federated.layout import Layout

__all__ = ["ATTACKS", "DEFENCES", "malicious_clients", "target_index", "poison_batch", "boost_upload",
           "exposure_summary", "combine_exposure", "robust_aggregate"]

ATTACKS = ("none", "label-flip", "scale", "item-promotion")
DEFENCES = ("none", "median", "trimmed-mean", "krum", "multi-krum", "norm-bound")

Params = dict[str, torch.Tensor]


def malicious_clients(*, seed: int, fraction: float, clients: int) -> np.ndarray:
    """The sorted ids of the malicious clients among ``0 .. clients - 1``: exactly
    ``floor(fraction x clients + 0.5)`` (halves round up; at least one when ``fraction`` > 0),
    the first of a permutation drawn from ``seed``."""
    if fraction <= 0:
        return np.zeros(0, dtype=np.int64)
    if clients < 1:
        raise ConfigError("'attack-fraction' needs the number of clients: set the run config's 'shards'")
    k = max(1, int(np.floor(fraction * clients + 0.5 + 1e-9)))
    if k >= clients:
        raise ConfigError(f"'attack-fraction' {fraction:g} of {clients} client(s) makes every client malicious "
                          "(no honest client is left to evaluate)")
    order = np.random.default_rng([int(seed), 7919]).permutation(clients)
    return np.sort(order[:k]).astype(np.int64)


def target_index(split, target: str, *, seed: int) -> int:
    """The catalogue index of the attack's target item: the raw id ``target`` (an error
    naming it when the catalogue lacks it), or, when empty, an item drawn from ``seed``
    (the same on every node: all share the catalogue)."""
    n = int(split.n_items)
    if not target:
        return 1 + int(np.random.default_rng([int(seed), 104729]).integers(n))
    raw = np.asarray(split.item_raw)
    hit = np.flatnonzero(raw.astype(str) == str(target))
    hit = hit[hit > 0]
    if not hit.size:
        raise ConfigError(f"run config 'attack-target': item {target!r} is not in the catalogue")
    return int(hit[0])


def poison_batch(attack: str, target: int) -> Callable[[dict], dict] | None:
    """What a malicious client does to its training batch (None: trains on it as it is)."""
    if attack == "label-flip":
        def flip(batch: dict) -> dict:
            out = dict(batch)
            mask = batch["target_mask"]
            out["target_labels"] = torch.where(mask, 1.0 - batch["target_labels"], batch["target_labels"])
            if "labels" in batch:  # the history's labels too: the whole log is flipped
                hist = batch["items"] > 0
                out["labels"] = torch.where(hist, 1 - batch["labels"], batch["labels"])
            return out
        return flip
    if attack == "item-promotion":
        def promote(batch: dict) -> dict:
            out = dict(batch)
            mask = batch["target_mask"]
            out["target_items"] = torch.where(mask, torch.full_like(batch["target_items"], target),
                                              batch["target_items"])
            out["target_labels"] = torch.where(mask, torch.ones_like(batch["target_labels"]), batch["target_labels"])
            if "negatives" in batch:  # next item: the target is never its own negative
                neg = batch["negatives"]
                out["negatives"] = torch.where(neg == target, torch.zeros_like(neg), neg)
            return out
        return promote
    return None


def boost_upload(layout: Layout, global_params: Params, upload, factor: float):
    """``upload`` with every mean scaled away from the global parameters by ``factor``:
    ``sum -> W x global + factor x (sum - W x global)`` (``W`` the weight, or a group's
    members)."""
    if factor == 1.0:
        return upload
    sums = {}
    for n, s in upload.sums.items():
        if n in layout.groups:
            layer, g = layout.groups[n]
            w = float(upload.group_counts[layer, g])
        else:
            w = float(upload.weight)
        base = global_params[n].to(torch.float64) * w
        sums[n] = (base + factor * (s.to(torch.float64) - base)).to(s.dtype)
    return replace(upload, sums=sums)


# -- exposure of the target item ---------------------------------------------------------
def exposure_summary(alg, shard, global_params: Params, state, *, target: int, ks, group_counts=None) -> dict[str, Any]:
    """A client's exposure counts of item ``target``: ``target-users`` (its users who never
    interacted with it) and per K ``target-hits@K`` (those whose top-K over the catalogue,
    seen items left out, contains it)."""
    users = np.asarray(shard.users, dtype=np.int64)
    out: dict[str, Any] = {"target-users": 0, **{f"target-hits@{k}": 0 for k in ks}}
    if not users.size:
        return out
    split = alg.split
    seen = split.seen_pairs()  # sorted keys user * (n_items + 1) + item
    n_cols = split.n_items + 1
    keep = ~np.isin(users * n_cols + target, seen)
    users = users[keep]
    if not users.size:
        return out
    seen_user, seen_item = seen // n_cols, seen % n_cols
    above = []
    chunk = int(alg.config.chunk_size)
    for start in range(0, users.size, chunk):  # users x items scores, one chunk at a time
        cu = users[start:start + chunk]
        scores = alg.score_items(global_params, state, cu, group_counts=group_counts).to(torch.float64)
        scores[:, 0] = -np.inf
        first = np.searchsorted(seen_user, cu, side="left")
        counts = np.searchsorted(seen_user, cu, side="right") - first
        idx = np.repeat(first - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
        scores[torch.from_numpy(np.repeat(np.arange(len(cu)), counts)), torch.from_numpy(seen_item[idx])] = -np.inf
        # the target's rank: how many items score strictly above it (ties broken in its favour)
        above.append((scores > scores[:, target:target + 1]).sum(1).numpy())
    rank = np.concatenate(above)
    out["target-users"] = int(users.size)
    for k in ks:
        out[f"target-hits@{k}"] = int((rank < k).sum())
    return out


def combine_exposure(summaries) -> dict[str, float]:
    """Pooled ``er@K`` from client summaries holding :func:`exposure_summary` counts."""
    summaries = [s for s in summaries if "target-users" in s]
    if not summaries:
        return {}
    users = sum(int(s["target-users"]) for s in summaries)
    ks = sorted(int(k.split("@")[1]) for k in summaries[0] if k.startswith("target-hits@"))
    out = {"er-users": float(users)}
    for k in ks:
        out[f"er@{k}"] = sum(int(s[f"target-hits@{k}"]) for s in summaries) / users if users else None
    return out


# -- robust aggregation ------------------------------------------------------------------
def _votes(layout: Layout, uploads) -> list[tuple[list[str], list[int], list[dict[str, torch.Tensor]], list[float]]]:
    """Per role block (the public parameters together; each group alone): its names, the
    voting uploads' positions, their mean models (float64) and their weights."""
    blocks = []
    shared = list(layout.shared)
    if shared:
        who = [i for i, u in enumerate(uploads) if u.weight > 0]
        blocks.append((shared, who, [{n: uploads[i].sums[n].to(torch.float64) / uploads[i].weight for n in shared}
                                     for i in who], [float(uploads[i].weight) for i in who]))
    for n, (layer, g) in layout.groups.items():
        who = [i for i, u in enumerate(uploads) if float(u.group_counts[layer, g]) > 0]
        blocks.append(([n], who, [{n: uploads[i].sums[n].to(torch.float64) / float(uploads[i].group_counts[layer, g])}
                                  for i in who], [float(uploads[i].group_counts[layer, g]) for i in who]))
    return blocks


def _flat(means: list[dict[str, torch.Tensor]], names: list[str]) -> np.ndarray:
    return np.stack([np.concatenate([m[n].reshape(-1).numpy() for n in names]) for m in means])


def _krum(means, names, f: int, select: int) -> list[int]:
    """Positions (into ``means``) Flower's Multi-Krum selects."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
    from flwr.serverapp.strategy.multikrum import select_multikrum

    contents = [RecordDict({"arrays": ArrayRecord({n: Array(m[n].numpy()) for n in names}),
                            "config": ConfigRecord({"pos": i})}) for i, m in enumerate(means)]
    chosen = select_multikrum(contents, num_malicious_nodes=f, num_nodes_to_select=select)
    return [int(c["config"]["pos"]) for c in chosen]


def robust_aggregate(layout: Layout, global_params: Params, uploads, *, method: str, fraction: float = 0.2,
                     norm: float = 0.0) -> tuple[Params, torch.Tensor, dict[str, Any]]:
    """:func:`~fedrec.federated.algorithm.aggregate_uploads` with the weighted mean of
    every role block replaced by the defence ``method`` (see the module docstring). The
    group counts (the balance loss's share) are the uploads' total, as without a defence."""
    from fedrec.federated.algorithm import aggregate_uploads
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

    if method not in DEFENCES:
        raise ConfigError(f"run config 'robust' must be one of {', '.join(DEFENCES)} (got {method!r})")
    if layout.aligned:
        raise ConfigError("robust aggregation is not defined for clients that send rows of their own users")
    new, counts, metrics = aggregate_uploads(layout, global_params, uploads)  # counts, loss, privacy
    if method == "none":
        return new, counts, metrics
    clipped = kept = 0
    # Krum's f: the malicious clients the defender allows for, out of all the round's clients
    # (a group's members may hold all of them)
    from fedrec.federated.failures import drawn_count

    f = drawn_count(fraction, len(uploads))
    for names, who, means, weights in _votes(layout, uploads):
        if not who:
            continue  # nobody voted: the aggregate left it unchanged
        n = len(means)
        m = method
        if m in ("krum", "multi-krum") and n <= 2 * f + 2:
            m = "median"  # too few votes for Krum's score
        if m == "median":
            for name in names:
                new[name] = torch.from_numpy(np.median(np.stack([v[name].numpy() for v in means]), axis=0))
        elif m == "trimmed-mean":
            for name in names:
                new[name] = torch.from_numpy(np.asarray(trim_mean(np.stack([v[name].numpy() for v in means]), fraction)))
        elif m in ("krum", "multi-krum"):
            deltas = [{name: v[name] - global_params[name].to(torch.float64) for name in names} for v in means]
            chosen = _krum(deltas, names, f, 1 if m == "krum" else n - f)  # the same choice, better conditioned
            kept += len(chosen)
            for name in names:
                new[name] = sum(means[i][name] for i in chosen) / len(chosen)
        else:  # norm-bound
            base = {name: global_params[name].to(torch.float64) for name in names}
            deltas = [{name: v[name] - base[name] for name in names} for v in means]
            norms = np.linalg.norm(_flat(deltas, names), axis=1)
            bound = norm if norm > 0 else float(np.median(norms))
            scale = np.minimum(1.0, bound / np.maximum(norms, 1e-300))
            clipped += int((norms > bound).sum())
            total = sum(weights)
            for name in names:
                new[name] = base[name] + sum(float(s) * w * d[name] for s, w, d in zip(scale, weights, deltas)) / total
        for name in names:
            new[name] = new[name].to(global_params[name].dtype)
    metrics = dict(metrics)
    if method == "norm-bound":
        metrics["robust-clipped"] = float(clipped)
    if method in ("krum", "multi-krum"):
        metrics["robust-kept"] = float(kept)
    return new, counts, metrics
