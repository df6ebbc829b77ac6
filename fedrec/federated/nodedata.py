"""What one node of a federation holds: its own users' data, items from the shared catalogue.

A node's data is found, in this order, from its node config and the run config:

1. ``catalogue`` (node config) with ``data`` (node config): the node's own file, e.g.
   ``--node-config 'data="parquet:/data/client-0.parquet" catalogue="/data/catalogue.parquet"
   shard=0'``: a real deployment.
2. ``federation`` (node config, or the run config: ``fedrec simulate --federation DIR``,
   ``flwr run --run-config 'federation="DIR"'``): a folder written by ``fedrec data
   partition``; the node reads only client ``shard`` (or Flower's ``partition-id``) of it.
3. Otherwise ``data`` (node config, else run config) names a whole dataset, and the node is
   shard ``shard`` of ``shards`` of it (a simulation from one dataset): the dataset is
   loaded once per process, partitioned exactly as ``fedrec data partition`` does, and the
   node keeps the same rows a federation folder would give it.

In every case the node's split is built by :func:`fedrec.data.split.split_dataset` on its own
rows with the catalogue, so user indices are local (1..its users), item indices are the
catalogue's, and nothing it computes depends on other nodes' users. The ``population`` (all
users of the federation, for the DP delta default and secure aggregation's scale) comes from
the run config, else the manifest, else the whole dataset in case 3; it stays unknown (0)
for a node of case 1 unless given.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


from fedrec.data.catalogue import Catalogue
from fedrec.data.split import SplitData, split_dataset
from fedrec.errors import ConfigError

__all__ = ["NODE_CONFIG_KEYS", "NodeData", "node_data", "node_client_id", "whole_dataset_view", "data_fingerprint", "source_stamp",
           "node_stamp"]

#: the keys a node config may hold (see the module docstring); ``partition-id`` and
#: ``num-partitions`` are set by Flower's simulation engine
NODE_CONFIG_KEYS = ("data", "catalogue", "federation", "shard", "shards", "partition-id", "num-partitions")

_lock = threading.Lock()
_views: dict[tuple, Any] = {}


@dataclass
class NodeData:
    """A node's split and what it reports about it (``info``: data, catalogue, users,
    rows, out-of-catalogue rows, the catalogue's and the data's fingerprints, client id,
    population)."""

    split: SplitData
    catalogue: Catalogue
    client: int | None
    population: int
    info: dict[str, Any] = field(default_factory=dict)


def node_client_id(node_config: Mapping[str, Any]) -> int | None:
    """The node's client id: ``shard`` from its node config, else Flower's ``partition-id``
    (simulations), else None."""
    value = node_config.get("shard", node_config.get("partition-id"))
    return None if value is None else int(value)


def _shards(node_config: Mapping[str, Any], spec) -> tuple[int, int]:
    shard = node_client_id(node_config)
    shards = node_config.get("shards", node_config.get("num-partitions", spec.shards or None))
    if shard is None or shards is None:
        raise ConfigError("node config needs 'shard' and 'shards' to take its part of a whole dataset (e.g. "
                          "--node-config \"shard=0 shards=2\"), or its own 'data' and 'catalogue', or 'federation'")
    shard, shards = int(shard), int(shards)
    if not 0 <= shard < shards:
        raise ConfigError(f"node config: shard {shard} is not in 0..{shards - 1}")
    return shard, shards


def source_stamp(text: str) -> tuple:
    """When and how big the files a data spec (or a plain path) names are, for caches that
    must not serve a file rewritten since (the same name, other contents): ``(name, mtime,
    size)`` of the file, or of each file directly inside the folder; ``()`` for a pathless
    spec (``synthetic:``) or a path that cannot be read (loading it then says why)."""
    import os

    from fedrec.data.spec import parse_spec

    try:
        path = Path(parse_spec(text).path) if ":" in text.split("?", 1)[0] else Path(text)
    except Exception:  # noqa: BLE001 - a malformed spec: loading it gives the one-line error
        return ()
    try:
        if path.is_dir():
            return tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size)
                                for e in os.scandir(path) if e.is_file()))
        if path.is_file():
            st = path.stat()
            return ((path.name, st.st_mtime_ns, st.st_size),)
    except OSError:
        pass
    return ()


def node_stamp(spec, node_config: Mapping[str, Any]) -> tuple:
    """:func:`source_stamp` of every file a node's data comes from (its own file, the
    catalogue, the federation folder, or the whole dataset)."""
    names = [str(node_config[k]) for k in ("data", "catalogue", "federation") if node_config.get(k)]
    names += [n for n in (spec.federation, spec.data) if n]
    return tuple(source_stamp(n) for n in names)


def whole_dataset_view(data: str, *, shards: int, partition: str, alpha: float, seed: int):
    """``(dataset, split, catalogue, parts)`` of a whole dataset, cached per process (a
    simulation's nodes share one load) while its files are unchanged (:func:`source_stamp`)."""
    from fedrec.data import load_dataset
    from fedrec.data.federation import partition_split

    from fedrec.data.federation import domain_clients

    key = (data, shards, partition, float(alpha), int(seed), source_stamp(data))
    with _lock:
        if key not in _views:
            _views.clear()  # one run at a time per process
            dataset = load_dataset(data)
            split = split_dataset(dataset)
            if partition == "domain":  # each part: the domains of one client
                parts = domain_clients(split, clients=shards)
            else:
                parts = partition_split(split, clients=shards, partition=partition, alpha=alpha, seed=seed)
            _views[key] = (dataset, split, Catalogue.from_split(split), parts)
        return _views[key]


def data_fingerprint(split: SplitData) -> str:
    """A short digest of what a node trains and is evaluated on: its users' raw ids, their
    rows (catalogue item, label, time, rating, split part, sequence) and user features. The
    same file read again gives the same digest; a file with other contents under the same
    path does not (a federated resume checks it: :class:`fedrec.federated.history.RunHistory`)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for name in ("user_raw", "seq_user", "seq_domain", "indptr", "item", "label", "time", "part", "rating",
                 "user_features", "user_group"):
        value = getattr(split, name, None)
        if value is None:
            h.update(f"{name}:none;".encode())
            continue
        value = np.asarray(value)
        h.update(f"{name}:{value.dtype.str if value.dtype != object else 'object'}{value.shape};".encode())
        if value.dtype == object:  # raw ids as text
            h.update("\x1f".join(map(str, value.tolist())).encode())
        else:
            h.update(np.ascontiguousarray(value).tobytes())
    h.update(f"out-of-catalogue:{int(split.out_of_catalogue)};".encode())
    return h.hexdigest()[:16]


def _local(dataset, catalogue: Catalogue, *, client: int | None, population: int, info: dict[str, Any]) -> NodeData:
    split = split_dataset(dataset, catalogue=catalogue)
    info = {**info, "users": int(split.n_users), "rows": int(len(split.item)),
            "out-of-catalogue": int(split.out_of_catalogue), "catalogue-fingerprint": catalogue.fingerprint(),
            "data-fingerprint": data_fingerprint(split), "client": -1 if client is None else int(client)}
    return NodeData(split, catalogue, client, population, info)


def node_data(spec, node_config: Mapping[str, Any]) -> NodeData:
    """The data of the node with ``node_config`` in the run ``spec`` (see the module
    docstring)."""
    from fedrec.data import load_dataset
    from fedrec.data.federation import client_entry, cut_dataset, cut_domains

    unknown = [k for k in node_config if k not in NODE_CONFIG_KEYS]
    if unknown:  # a misspelt key would silently fall back to another way of finding the data
        raise ConfigError(f"node config: unknown key '{unknown[0]}' (known: {', '.join(NODE_CONFIG_KEYS)})")
    client = node_client_id(node_config)
    population = int(spec.federated.population)
    if "catalogue" in node_config:
        if "data" not in node_config:
            raise ConfigError("node config has 'catalogue' but no 'data' (the node's own file)")
        path = Path(str(node_config["catalogue"]))
        catalogue = Catalogue.load(path)
        data = str(node_config["data"])
        return _local(load_dataset(data), catalogue, client=client, population=population,
                      info={"data": data, "catalogue": str(path), "mode": "node-local"})
    federation = node_config.get("federation") or spec.federation
    if federation:
        if client is None:
            raise ConfigError("node config needs 'shard' (its client number in the federation folder)")
        data, catalogue_path, manifest = client_entry(federation, client)
        catalogue = Catalogue.load(catalogue_path)
        recorded = manifest.get("catalogue_fingerprint")
        if recorded and catalogue.fingerprint() != recorded:  # else rows of items it lacks vanish silently
            raise ConfigError(f"{catalogue_path}: not the catalogue this federation folder was written with "
                              f"(fingerprint {catalogue.fingerprint()}, the manifest records {recorded}); restore "
                              "it, or write the folder again with `fedrec data partition`")
        return _local(load_dataset(data), catalogue, client=client,
                      population=population or int(manifest["population"]),
                      info={"data": data, "catalogue": str(catalogue_path), "mode": "federation",
                            "federation": str(federation)})
    data = str(node_config.get("data", spec.data))
    shard, shards = _shards(node_config, spec)
    dataset, split, catalogue, parts = whole_dataset_view(data, shards=shards, partition=spec.partition,
                                                          alpha=spec.partition_alpha, seed=spec.partition_seed)
    if len(parts) != shards:  # pragma: no cover - partition_users guarantees it
        raise ConfigError(f"partition gave {len(parts)} shards, not {shards}")
    if spec.partition == "domain":
        own = cut_domains(dataset, parts[shard], name=f"{data}#shard-{shard}")
    else:
        own = cut_dataset(dataset, split.user_raw[parts[shard]], name=f"{data}#shard-{shard}")
    return _local(own, catalogue, client=shard, population=population or int(split.n_users),
                  info={"data": data, "shard": shard, "shards": shards, "mode": "one-dataset"})
