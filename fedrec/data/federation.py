"""Federation folders: one dataset turned into what each node of a real federation holds.

``fedrec data partition SPEC --clients K --out DIR`` writes

``catalogue.parquet``
    the shared item catalogue (:class:`~fedrec.data.catalogue.Catalogue`): items are public;
``client-<k>.parquet``
    client ``k``'s users' interactions only, raw ids, canonical column names (``user``,
    ``item``, ``time`` and, when the source has them, ``label``, ``rating``, ``value``,
    ``domain``, ``split``), rows in the source's order, readable as ``parquet:client-<k>.parquet``;
``client-<k>.users.parquet``
    (when the source has user features) those users' feature codes (``user`` + one column
    per field), read with ``parquet:client-<k>.parquet?user_features=client-<k>.users.parquet``;
``manifest.json``
    the clients (file, data spec, users, rows), the total number of users (the
    ``population``), the split rule, the partition, the source spec and the source format's
    run defaults (so ``fedrec simulate --federation DIR`` needs no more flags than
    ``--data SPEC``).

The users of a client are the partition (:func:`partition_split`) of the users that the
whole dataset's split keeps; the same function serves ``fedrec simulate --data SPEC
--clients K``, which cuts the same per-client datasets in memory (:func:`client_datasets`),
so a run over the folder equals the one-dataset simulation.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.data.catalogue import CATALOGUE_FILE, Catalogue
from fedrec.data.interactions import Dataset, Interactions
from fedrec.data.partition import dominant_item_feature, partition_domains, partition_users
from fedrec.data.split import SplitConfig, SplitData, split_dataset
from fedrec.errors import ConfigError, DataError

__all__ = ["MANIFEST_FILE", "partition_split", "domain_clients", "cut_domains", "cut_dataset", "client_datasets",
           "write_federation",
           "load_manifest", "client_entry", "is_federation"]

MANIFEST_FILE = "manifest.json"
_KIND = "fedrec-federation"
_VERSION = 1


def partition_split(split: SplitData, *, clients: int, partition: str = "iid", alpha: float = 0.5,
                    seed: int = 0) -> list[np.ndarray]:
    """The user indices of each client: ``partition`` (``iid`` or ``dirichlet``) of the
    split's users into ``clients`` shards. Dirichlet labels are the users' true groups
    (synthetic data) or their dominant category (the first item feature)."""
    users = np.arange(1, split.n_users + 1)
    labels = None
    if partition == "dirichlet":
        if split.user_group is not None:
            labels = split.user_group[users]
        elif split.item_feature_names:
            labels = dominant_item_feature(split, split.item_feature_names[0])[users]
        else:
            raise ConfigError("partition 'dirichlet' needs user groups or item features to draw labels from")
    elif partition == "domain":
        raise ConfigError("partition 'domain' gives each client domains, not users: use domain_clients()")
    elif partition != "iid":
        raise ConfigError(f"partition must be iid, dirichlet or domain (got {partition!r})")
    parts = partition_users(users, scheme=partition, num_clients=clients, seed=seed, alpha=alpha, labels=labels)
    return [np.asarray(p, dtype=np.int64) for p in parts]


def domain_clients(split: SplitData, *, clients: int | None = None) -> list[list[str]]:
    """The domains of each client under the ``domain`` partition (cross-domain data): one
    domain per client (``clients`` None or the number of domains), else dealt round-robin
    (:func:`~fedrec.data.partition.partition_domains`)."""
    if not split.domains:
        raise ConfigError("partition 'domain' needs multi-domain data (e.g. cdr:DIR)")
    return partition_domains(split.domains, num_clients=clients)


def cut_domains(dataset: Dataset, domains: list[str], *, name: str) -> Dataset:
    """The part of ``dataset`` a node holding ``domains`` has: those domains' interaction rows
    (in the source's order) and the features of the users that have any."""
    frame = dataset.interactions.frame
    if "domain" not in frame.columns:
        raise ConfigError("partition 'domain' needs multi-domain data (rows with a domain)")
    keep = frame["domain"].isin(domains).to_numpy()
    return _cut(dataset, keep, frame.loc[keep, "user"].unique(), name=name,
                meta={"cut-from": dataset.name, "domains": list(domains)})


def cut_dataset(dataset: Dataset, raw_users: np.ndarray, *, name: str) -> Dataset:
    """The part of ``dataset`` a node holding ``raw_users`` has: their interaction rows (in
    the source's order) and their user features. Item features are not a node's: they come
    from the catalogue."""
    keep = dataset.interactions.frame["user"].isin(raw_users).to_numpy()
    return _cut(dataset, keep, raw_users, name=name, meta={"cut-from": dataset.name})


def _cut(dataset: Dataset, keep: np.ndarray, raw_users: np.ndarray, *, name: str, meta: dict) -> Dataset:
    """The rows ``keep`` of ``dataset`` and the user features / groups of ``raw_users``."""
    rows = dataset.interactions.frame.loc[keep].reset_index(drop=True)
    users = groups = None
    if dataset.user_features is not None:
        users = dataset.user_features.loc[dataset.user_features.index.isin(raw_users)]
    if dataset.user_groups is not None:
        groups = dataset.user_groups.loc[dataset.user_groups.index.isin(raw_users)]
    return Dataset(name, Interactions(rows, name), user_features=users, user_groups=groups, meta=meta)


def client_datasets(dataset: Dataset, split: SplitData, parts: list[np.ndarray], *, name: str = "") -> list[Dataset]:
    """One :func:`cut_dataset` per client of ``parts`` (user indices of ``split``)."""
    return [cut_dataset(dataset, split.user_raw[p], name=f"{name or dataset.name}#client-{k}")
            for k, p in enumerate(parts)]


def write_federation(spec: str, out: str | Path, *, clients: int, partition: str = "iid", alpha: float = 0.5,
                     seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Write the federation folder of ``spec`` (see the module docstring) and return its
    manifest. ``out`` must not exist or be empty; the folder is written next to it and
    renamed into place at the end, so a failure leaves nothing behind."""
    from fedrec.data import load_dataset
    from fedrec.federated.defaults import defaults_for

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: exists and is not an empty folder (choose a new --out; nothing was written)")
    dataset = load_dataset(spec)
    config = SplitConfig()
    split = split_dataset(dataset, config)
    if partition == "domain":
        domains = domain_clients(split, clients=clients)
        parts = [np.unique(split.seq_user[np.isin(split.seq_domain, [split.domains.index(d) for d in ds])])
                 for ds in domains]
        cuts = [cut_domains(dataset, ds, name=f"{dataset.name}#client-{k}") for k, ds in enumerate(domains)]
    else:
        parts = partition_split(split, clients=clients, partition=partition, alpha=alpha, seed=seed)
        cuts = client_datasets(dataset, split, parts)
    catalogue = Catalogue.from_split(split)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    from fedrec.files import umask

    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private
    try:
        catalogue.save(tmp / CATALOGUE_FILE)
        entries = []
        iterator = enumerate(cuts)
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, total=len(parts), desc="clients", unit="file")
        for k, part in iterator:
            frame = part.interactions.frame
            file = f"client-{k}.parquet"
            frame.to_parquet(tmp / file, index=False)
            data = f"parquet:{file}"
            if part.user_features is not None:
                users_file = f"client-{k}.users.parquet"
                part.user_features.rename_axis("user").reset_index().to_parquet(tmp / users_file, index=False)
                data += f"?user_features={users_file}"
            entry = {"client": k, "file": file, "data": data, "users": int(len(parts[k])), "rows": int(len(frame))}
            if partition == "domain":
                entry["domains"] = list(domains[k])
            entries.append(entry)
        manifest = {
            "kind": _KIND, "version": _VERSION, "source": spec, "clients": entries,
            "population": int(split.n_users), "items": int(catalogue.n_items), "catalogue": CATALOGUE_FILE,
            "catalogue_fingerprint": catalogue.fingerprint(),
            "split": {"method": split.method, "min_interactions": config.min_interactions},
            "partition": {"scheme": partition, "clients": int(clients), "seed": int(seed),
                          **({"alpha": float(alpha)} if partition == "dirichlet" else {})},
            "defaults": defaults_for(spec),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def is_federation(path: str | Path) -> bool:
    """Whether ``path`` is a folder with a federation manifest."""
    return (Path(path) / MANIFEST_FILE).is_file()


def load_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a federation folder (one-line errors for a missing or bad one)."""
    path = Path(folder) / MANIFEST_FILE
    if not Path(folder).is_dir():
        raise DataError("federation folder not found", file=folder)
    if not path.is_file():
        raise DataError(f"not a federation folder (no {MANIFEST_FILE}; write one with `fedrec data partition`)",
                        file=folder)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read the manifest ({exc})", file=path) from None
    if not isinstance(manifest, dict) or manifest.get("kind") != _KIND:
        raise DataError(f"not a fedrec federation manifest (no \"kind\": \"{_KIND}\")", file=path)
    if manifest.get("version") != _VERSION:
        raise DataError(f"unsupported manifest version {manifest.get('version')!r} (this fedrec reads {_VERSION})",
                        file=path)
    for key in ("clients", "population", "catalogue", "source"):
        if key not in manifest:
            raise DataError(f"manifest has no {key!r}", file=path)
    return manifest


def client_entry(folder: str | Path, client: int) -> tuple[str, Path, dict[str, Any]]:
    """``(data spec with the folder's path, catalogue path, manifest)`` of client ``client``."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    entries = {int(e["client"]): e for e in manifest["clients"]}
    if client not in entries:
        raise ConfigError(f"{folder}: no client {client} in the manifest (clients 0..{len(entries) - 1})")
    fmt, _, rest = entries[client]["data"].partition(":")
    return f"{fmt}:{folder / rest}", folder / manifest["catalogue"], manifest
