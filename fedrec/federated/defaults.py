"""Sensible per-dataset defaults for federated runs, so that ``fedrec simulate --data SPEC``
alone gives a good result. The user's own keys always win (they are applied over these).

Chosen from the runs recorded in ``simulations/results/`` (see the README's federated
results): the values there, not guesses.
"""

from __future__ import annotations

from typing import Any

__all__ = ["defaults_for"]

# format -> flat run-config keys
_BY_FORMAT: dict[str, dict[str, Any]] = {
    # the embedded default: small enough to finish in a couple of minutes on 2 cores
    "synthetic": {"task": "ctr", "rounds": 40, "shards": 4, "eval-every": 5},
    # MRFF's reference setting on KuaiSAR-R: item attributes only, no item-id table; the
    # best validation round came at 45 of 60 (simulations/results/fed_kuaisar.json)
    "kuaisar": {"task": "ctr", "rounds": 60, "shards": 1, "eval-every": 5, "model.item-repr": "attributes"},
    "movielens": {"task": "ctr", "rounds": 60, "shards": 1, "eval-every": 5, "model.max-len": 50},
    "csv": {"task": "ctr"},
    "parquet": {"task": "ctr"},
    "seq": {"task": "next_item", "protocol": "sampled-99"},
    "pairs": {"task": "next_item", "protocol": "sampled-99"},
}


def defaults_for(data: str) -> dict[str, Any]:
    """Default run-config keys for the data spec's format (empty for unknown formats)."""
    fmt = data.split(":", 1)[0].strip().lower()
    return dict(_BY_FORMAT.get(fmt, {}))
