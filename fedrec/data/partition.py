"""Map users (or domains) to federated clients.

A *partition* is a list with one entry per client; each entry is a sorted
``int64`` array of the user indices that client holds.  Every user appears in
exactly one client and no client is empty.  All schemes are deterministic for a
given ``seed``; the result depends only on the *set* of users (and their
labels), not on the order they are given in.

Schemes (``PARTITION_SCHEMES``)
-------------------------------
``"user"``
    One user per client -- the classic federated recommendation setting where
    each device holds exactly one user's interactions.  ``num_clients`` must be
    ``None`` or equal to the number of users.
``"iid"``
    Users are shuffled with the seed and cut into ``num_clients`` contiguous
    shards whose sizes differ by at most one.
``"dirichlet"``
    Label-skewed non-IID split.  Each user carries a label (e.g. its latent
    group or dominant item category); for every label value the users holding
    it are divided among the clients with proportions drawn from
    ``Dirichlet(alpha)``.  Small ``alpha`` (e.g. 0.1) gives clients dominated by
    few labels, large ``alpha`` (e.g. 100) approaches an IID split.  Draws that
    leave a client empty are repeated a bounded number of times, after which a
    :class:`~fedrec.errors.ConfigError` is raised.

Cross-domain settings use :func:`partition_domains` instead: one domain per
client, or domains dealt round-robin to fewer clients.

:func:`label_distribution` turns a partition into a (clients x labels) count
matrix, which shows how non-IID a partition is.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedrec.errors import ConfigError

__all__ = [
    "PARTITION_SCHEMES",
    "partition_users",
    "partition_domains",
    "label_distribution",
    "dominant_item_feature",
]

PARTITION_SCHEMES: tuple[str, ...] = ("user", "iid", "dirichlet")


def _as_users(users: Any) -> np.ndarray:
    """Validate ``users`` and return them as a 1-D ``int64`` array."""
    arr = np.asarray(users)
    if arr.ndim != 1:
        raise ConfigError(f"users must be a 1-D array of user indices, got shape {arr.shape}")
    if arr.size == 0:
        raise ConfigError("users is empty: there is nothing to partition")
    if arr.dtype.kind not in "iu":
        raise ConfigError(f"users must be integer user indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    uniq, counts = np.unique(arr, return_counts=True)
    if uniq.size != arr.size:
        dup = int(uniq[counts > 1][0])
        raise ConfigError(f"users must be unique, user {dup} appears more than once")
    return arr


def _check_num_clients(num_clients: Any, num_users: int, what: str = "users") -> int:
    """Validate ``num_clients`` against the number of items to spread."""
    if isinstance(num_clients, (bool, np.bool_)) or not isinstance(
        num_clients, (int, np.integer)
    ):
        raise ConfigError(f"num_clients must be an integer, got {num_clients!r}")
    k = int(num_clients)
    if k < 1:
        raise ConfigError(f"num_clients must be at least 1, got {k}")
    if k > num_users:
        raise ConfigError(
            f"num_clients={k} is larger than the number of {what} ({num_users}); "
            "every client needs at least one"
        )
    return k


def partition_users(
    users: Any,
    *,
    scheme: str,
    num_clients: int | None = None,
    seed: int = 0,
    alpha: float = 0.5,
    labels: Any = None,
) -> list[np.ndarray]:
    """Split users among federated clients.

    Parameters
    ----------
    users : array_like of int
        1-D array of distinct user indices (e.g. ``1..U``).
    scheme : str
        One of :data:`PARTITION_SCHEMES`: ``"user"``, ``"iid"`` or
        ``"dirichlet"`` (see the module docstring).
    num_clients : int, optional
        Number of clients.  For ``"user"`` it must be ``None`` or
        ``len(users)``; ``"iid"`` and ``"dirichlet"`` require it, with
        ``1 <= num_clients <= len(users)``.
    seed : int, default 0
        Seed of the random split (unused by ``"user"``).
    alpha : float, default 0.5
        Dirichlet concentration (``"dirichlet"`` only); must be ``> 0``.
    labels : array_like, optional
        One label per user, aligned with ``users`` (``"dirichlet"`` only,
        where it is required).

    Returns
    -------
    list of numpy.ndarray
        One sorted ``int64`` array of user indices per client.  Every user is
        in exactly one client; no client is empty.

    Raises
    ------
    ConfigError
        Unknown scheme, invalid ``num_clients``/``alpha``/``labels``/``users``,
        or a Dirichlet split that keeps leaving a client empty.

    Notes
    -----
    ``"iid"`` is implemented with numpy (``Generator.permutation`` then
    ``numpy.array_split``): flwr-datasets' ``IidPartitioner`` does not shuffle
    (it takes contiguous ``Dataset.shard`` slices) and would need a
    ``datasets.Dataset`` round trip for no gain.  ``"dirichlet"`` uses
    flwr-datasets' ``DirichletPartitioner`` (imported lazily, as importing
    ``flwr_datasets`` takes seconds) with ``self_balancing=False`` so the
    per-label proportions are plain ``Dirichlet(alpha)`` draws, and
    ``min_partition_size=1`` so no client is empty.
    """
    if scheme not in PARTITION_SCHEMES:
        raise ConfigError(
            f"unknown partition scheme {scheme!r}; known schemes: {', '.join(PARTITION_SCHEMES)}"
        )
    arr = _as_users(users)
    n = arr.size

    if scheme == "user":
        if num_clients is not None:
            k = _check_num_clients(num_clients, n)
            if k != n:
                raise ConfigError(
                    f"scheme 'user' puts one user per client, so num_clients must be None "
                    f"or {n} (the number of users), got {k}"
                )
        return [np.array([u], dtype=np.int64) for u in np.sort(arr)]

    if num_clients is None:
        raise ConfigError(f"scheme {scheme!r} needs num_clients (got None)")
    k = _check_num_clients(num_clients, n)

    if scheme == "iid":
        rng = np.random.default_rng(seed)
        shuffled = rng.permutation(np.sort(arr))
        return [np.sort(chunk) for chunk in np.array_split(shuffled, k)]

    # scheme == "dirichlet"
    return _partition_dirichlet(arr, labels, k, seed, alpha)


def _partition_dirichlet(
    users: np.ndarray, labels: Any, k: int, seed: int, alpha: Any
) -> list[np.ndarray]:
    """Label-skewed split via flwr-datasets' ``DirichletPartitioner``."""
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ConfigError(f"alpha must be a positive number, got {alpha!r}") from None
    if not np.isfinite(a) or a <= 0:
        raise ConfigError(f"alpha must be a positive number, got {alpha!r}")
    if labels is None:
        raise ConfigError("scheme 'dirichlet' needs labels (one per user), got None")
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.size != users.size:
        raise ConfigError(
            f"labels must be a 1-D array with one label per user ({users.size}), "
            f"got shape {lab.shape}"
        )

    # Canonical order so the split depends on the (user, label) pairs only.
    order = np.argsort(users, kind="stable")
    users_sorted = users[order]
    labels_sorted = lab[order]

    import datasets  # noqa: PLC0415 - slow import, only needed here
    from flwr_datasets.partitioner import DirichletPartitioner  # noqa: PLC0415

    partitioner = DirichletPartitioner(
        num_partitions=k,
        partition_by="label",
        alpha=a,
        min_partition_size=1,
        self_balancing=False,
        shuffle=False,
        seed=int(seed),
    )
    partitioner.dataset = datasets.Dataset.from_dict(
        {"user": users_sorted, "label": labels_sorted.tolist()}
    )
    try:
        with warnings.catch_warnings():
            # flwr-datasets warns on every re-draw; the outcome is reported below.
            warnings.simplefilter("ignore")
            parts = [
                np.sort(np.asarray(partitioner.load_partition(i)["user"], dtype=np.int64))
                for i in range(k)
            ]
    except ValueError as exc:
        raise ConfigError(
            f"dirichlet split with alpha={a} left a client empty after repeated draws "
            f"({k} clients, {users.size} users); use a larger alpha or fewer clients "
            f"[flwr-datasets: {' '.join(str(exc).split())}]"
        ) from None

    # Defensive: the partitioner promises this, the API promises it too.
    if any(p.size == 0 for p in parts) or sum(p.size for p in parts) != users.size:
        raise ConfigError(
            f"dirichlet split with alpha={a} produced an invalid partition for "
            f"{k} clients; use a larger alpha or fewer clients"
        )
    return parts


def partition_domains(domains: Sequence[str], *, num_clients: int | None = None) -> list[list[str]]:
    """Assign domains to clients for cross-domain federated recommendation.

    Parameters
    ----------
    domains : sequence of str
        Distinct domain names, in the order they should be dealt.
    num_clients : int, optional
        ``None`` (default) or ``len(domains)`` gives one domain per client.
        A smaller value deals the domains round-robin: domain ``i`` goes to
        client ``i % num_clients``.

    Returns
    -------
    list of list of str
        The domains each client holds; every domain exactly once, no client
        empty.

    Raises
    ------
    ConfigError
        No domains, duplicate domains, ``num_clients < 1`` or
        ``num_clients > len(domains)``.
    """
    if isinstance(domains, str):
        raise ConfigError(f"domains must be a sequence of domain names, got the string {domains!r}")
    names = [str(d) for d in domains]
    if not names:
        raise ConfigError("domains is empty: there is nothing to partition")
    seen: set[str] = set()
    for d in names:
        if d in seen:
            raise ConfigError(f"domains must be unique, domain {d!r} appears more than once")
        seen.add(d)
    if num_clients is None:
        return [[d] for d in names]
    k = _check_num_clients(num_clients, len(names), what="domains")
    out: list[list[str]] = [[] for _ in range(k)]
    for i, d in enumerate(names):
        out[i % k].append(d)
    return out


def label_distribution(parts: Sequence[Any], labels_by_user: Any) -> np.ndarray:
    """Count, per client, how many of its users carry each label.

    Parameters
    ----------
    parts : sequence of array_like of int
        A partition, as returned by :func:`partition_users`.
    labels_by_user : mapping or array_like
        The label of each user, looked up by user index: a dict-like
        ``{user: label}`` or an array with ``labels_by_user[user]`` the label
        of ``user`` (so for users ``1..U`` index 0 is unused).

    Returns
    -------
    numpy.ndarray
        ``int64`` matrix of shape ``(num_clients, num_label_values)``; columns
        follow the sorted distinct labels of the users in ``parts``.

    Raises
    ------
    ConfigError
        A user has no label in ``labels_by_user``.
    """
    per_client: list[np.ndarray] = []
    for part in parts:
        users = np.asarray(part, dtype=np.int64).ravel()
        if isinstance(labels_by_user, Mapping):
            try:
                labs = [labels_by_user[int(u)] for u in users]
            except KeyError as exc:
                raise ConfigError(f"labels_by_user has no label for user {exc.args[0]}") from None
            per_client.append(np.asarray(labs))
        else:
            table = np.asarray(labels_by_user)
            if users.size and (users.min() < 0 or users.max() >= table.shape[0]):
                bad = users[(users < 0) | (users >= table.shape[0])][0]
                raise ConfigError(
                    f"labels_by_user has no label for user {int(bad)} "
                    f"(it holds {table.shape[0]} entries)"
                )
            per_client.append(table[users])
    non_empty = [p for p in per_client if p.size]
    values = np.unique(np.concatenate(non_empty)) if non_empty else np.array([])
    counts = np.zeros((len(per_client), values.size), dtype=np.int64)
    for i, labs in enumerate(per_client):
        if labs.size:
            idx = np.searchsorted(values, labs)
            counts[i] = np.bincount(idx, minlength=values.size)
    return counts


def dominant_item_feature(split: Any, field: str) -> np.ndarray:
    """Per-user label for a Dirichlet split: the most frequent code of item feature
    ``field`` among the user's training interactions (ties -> the smallest code).

    Returns an array of length ``split.n_users + 1`` indexed by user index (entry 0, the
    padding user, is 0), so ``labels=dominant_item_feature(split, "category")[users]``.
    Raises :class:`ConfigError` when the data has no item feature ``field``.
    """
    names = list(getattr(split, "item_feature_names", []) or [])
    if split.item_features is None or field not in names:
        raise ConfigError(f"no item feature {field!r} in this data (item features: {', '.join(names) or 'none'})")
    from fedrec.data.split import TRAIN

    rows = np.flatnonzero(split.part == TRAIN)
    users = split.row_user[rows]
    codes = split.item_features[split.item[rows], names.index(field)]
    n_codes = int(split.item_features[:, names.index(field)].max()) + 1
    counts = np.zeros((split.n_users + 1, n_codes), dtype=np.int64)
    np.add.at(counts, (users, codes), 1)
    out = counts.argmax(axis=1)
    out[0] = 0
    return out
