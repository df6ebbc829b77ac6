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

__all__ = ["NodeData", "node_data", "node_client_id", "whole_dataset_view"]

_lock = threading.Lock()
_views: dict[tuple, Any] = {}


@dataclass
class NodeData:
    """A node's split and what it reports about it (``info``: data, catalogue, users,
    rows, out-of-catalogue rows, client id, population)."""

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


def whole_dataset_view(data: str, *, shards: int, partition: str, alpha: float, seed: int):
    """``(dataset, split, catalogue, parts)`` of a whole dataset, cached per process (a
    simulation's nodes share one load)."""
    from fedrec.data import load_dataset
    from fedrec.data.federation import partition_split

    from fedrec.data.federation import domain_clients

    key = (data, shards, partition, float(alpha), int(seed))
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


def _local(dataset, catalogue: Catalogue, *, client: int | None, population: int, info: dict[str, Any]) -> NodeData:
    split = split_dataset(dataset, catalogue=catalogue)
    info = {**info, "users": int(split.n_users), "rows": int(len(split.item)),
            "out-of-catalogue": int(split.out_of_catalogue), "catalogue-fingerprint": catalogue.fingerprint(),
            "client": -1 if client is None else int(client)}
    return NodeData(split, catalogue, client, population, info)


def node_data(spec, node_config: Mapping[str, Any]) -> NodeData:
    """The data of the node with ``node_config`` in the run ``spec`` (see the module
    docstring)."""
    from fedrec.data import load_dataset
    from fedrec.data.federation import client_entry, cut_dataset, cut_domains

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
