"""The shared item catalogue of a federation: items are public, users are not.

In a federated run every node and the server share one catalogue: the raw item ids (their
position gives the item index, 1..I, 0 = padding), the item feature codes the model reads,
the domain of each item (cross-domain data), and the *schema* of the user features (field
names and their number of codes, so that every node builds the same model). It holds no
user and no interaction. Item indices come from the catalogue, never from what one node's
logs happen to contain, so every node's item rows line up with everyone else's.

A node's split is built with :func:`fedrec.data.split.split_dataset` ``(dataset,
catalogue=...)``: rows whose item the catalogue lacks are **dropped** before splitting and
counted (``SplitData.out_of_catalogue``; nodes report the count to the server, which keeps
it in the run's result), never renumbered.

File format: one Parquet file (``catalogue.parquet``) with columns ``item`` (raw id, sorted),
``domain`` (only on multi-domain data) and one ``f.<field>`` column of integer codes per item
feature; the schema lives in the file's key-value metadata under ``fedrec.catalogue``
(JSON: version, item fields, user fields and their cardinalities, domains).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedrec.errors import DataError
from fedrec.files import atomic_path

__all__ = ["Catalogue", "CATALOGUE_FILE"]

CATALOGUE_FILE = "catalogue.parquet"
_META_KEY = b"fedrec.catalogue"
_VERSION = 1


@dataclass
class Catalogue:
    """Items (raw id -> index), their feature codes and domains, and the user feature schema.

    Attributes
    ----------
    item_raw:
        ``(I,)`` sorted raw item ids; item ``i`` (1-based index) is ``item_raw[i - 1]``.
    item_features:
        ``(I, F)`` integer codes (0 = missing) or None; ``item_feature_names`` names them.
    domains, item_domain:
        Domain names and ``(I,)`` domain index per item (empty / None on single-domain data).
    user_feature_names, user_cardinalities:
        The user feature fields every node's data must carry, and per field the number of
        codes (max code + 1) that sizes the model's user-field tables.
    """

    item_raw: np.ndarray
    item_features: np.ndarray | None = None
    item_feature_names: list[str] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)
    item_domain: np.ndarray | None = None
    user_feature_names: list[str] = field(default_factory=list)
    user_cardinalities: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.item_raw = np.asarray(self.item_raw, dtype=np.int64)
        if self.item_raw.size == 0:
            raise DataError("the catalogue has no items")
        if np.any(np.diff(self.item_raw) <= 0):
            raise DataError("catalogue item ids must be unique and sorted")
        if len(self.user_feature_names) != len(self.user_cardinalities):
            raise DataError("catalogue: one cardinality per user field is needed")

    @property
    def n_items(self) -> int:
        """Number of items (indices 1..n_items)."""
        return int(self.item_raw.size)

    def index(self, raw_items: np.ndarray) -> np.ndarray:
        """Item index (1..I) of each raw id; 0 where the catalogue lacks the item."""
        raw_items = np.asarray(raw_items, dtype=np.int64)
        pos = np.searchsorted(self.item_raw, raw_items)
        pos_c = np.minimum(pos, self.n_items - 1)
        return np.where(self.item_raw[pos_c] == raw_items, pos_c + 1, 0).astype(np.int64)

    @classmethod
    def from_split(cls, split) -> "Catalogue":
        """The catalogue of a whole-dataset split: its items, item codes and domains, and
        the user schema (field cardinalities over all of its users)."""
        item_features = None if split.item_features is None else np.asarray(split.item_features[1:], dtype=np.int64)
        item_domain = np.asarray(split.item_domain[1:], dtype=np.int64) if split.domains else None
        cards: tuple[int, ...] = ()
        if split.user_features is not None:
            cards = tuple(int(c) + 1 for c in np.asarray(split.user_features).max(axis=0))
        return cls(np.asarray(split.item_raw[1:], dtype=np.int64), item_features, list(split.item_feature_names),
                   list(split.domains), item_domain, list(split.user_feature_names), cards)

    def fingerprint(self) -> str:
        """A short digest of the catalogue's content (to check that nodes share one)."""
        import hashlib

        h = hashlib.sha256(self.item_raw.tobytes())
        if self.item_features is not None:
            h.update(np.ascontiguousarray(self.item_features).tobytes())
        h.update(json.dumps([self.item_feature_names, self.domains, self.user_feature_names,
                             list(self.user_cardinalities)]).encode())
        if self.item_domain is not None:
            h.update(self.item_domain.tobytes())
        return h.hexdigest()[:16]

    # -- files ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the catalogue as Parquet (atomically: temporary file + rename)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = Path(path)
        columns = {"item": self.item_raw}
        if self.item_domain is not None:
            columns["domain"] = np.asarray(self.domains, dtype=object)[self.item_domain]
        for j, name in enumerate(self.item_feature_names):
            columns[f"f.{name}"] = self.item_features[:, j]
        table = pa.Table.from_pandas(pd.DataFrame(columns), preserve_index=False)
        meta = {"version": _VERSION, "item_fields": self.item_feature_names, "domains": self.domains,
                "user_fields": self.user_feature_names, "user_cardinalities": list(self.user_cardinalities)}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), _META_KEY: json.dumps(meta).encode()})
        with atomic_path(path) as tmp:  # a catalogue is public: the mode open() would give
            pq.write_table(table, tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Catalogue":
        """Read a catalogue written by :meth:`save` (one-line errors for anything else)."""
        import pyarrow.parquet as pq

        path = Path(path)
        if not path.is_file():
            raise DataError("catalogue file not found", file=path)
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a non-parquet file
            raise DataError(f"cannot read the catalogue ({str(exc).strip().splitlines()[0]})", file=path) from None
        raw_meta = (table.schema.metadata or {}).get(_META_KEY)
        if raw_meta is None:
            raise DataError("not a fedrec catalogue (no 'fedrec.catalogue' metadata; write one with "
                            "`fedrec data partition`)", file=path)
        meta = json.loads(raw_meta)
        if meta.get("version") != _VERSION:
            raise DataError(f"unsupported catalogue version {meta.get('version')!r} (this fedrec reads {_VERSION})",
                            file=path)
        frame = table.to_pandas()
        for col in ["item", *(f"f.{n}" for n in meta["item_fields"])]:
            if col not in frame.columns:
                raise DataError("catalogue column missing", file=path, column=col)
        features = None
        if meta["item_fields"]:
            features = frame[[f"f.{n}" for n in meta["item_fields"]]].to_numpy(dtype=np.int64)
        domains = list(meta.get("domains", []))
        item_domain = None
        if domains:
            item_domain = pd.Index(domains).get_indexer(frame["domain"].astype(str)).astype(np.int64)
            if (item_domain < 0).any():
                raise DataError("an item's domain is not among the catalogue's domains", file=path, column="domain")
        try:
            return cls(frame["item"].to_numpy(dtype=np.int64), features, list(meta["item_fields"]), domains,
                       item_domain, list(meta["user_fields"]), tuple(int(c) for c in meta["user_cardinalities"]))
        except DataError as exc:
            raise DataError(str(exc), file=path) from None


