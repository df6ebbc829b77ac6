"""Cost of building a client's evaluation inputs from a shared split, per one-user shard.

Federated clients slice one :class:`~fedrec.data.split.SplitData` into shards
(``ExampleSet.subset``); the split caches its derived indexes, so only the first call pays
for them. Prints, measured in one run: the first ``exclusions()`` call on Beauty's test
examples vs the mean over 200 one-user shards, and the same for ``cdr`` batches on
DisenCDR Sport-Cloth.

Usage::

    python simulations/bench_data_shards.py [--data-root ../shared/data] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fedrec.data import load_dataset
from fedrec.data.batching import build_examples, iterate_batches
from fedrec.data.samplers import UniformNegativeSampler
from fedrec.data.split import split_dataset

ROOT = Path(__file__).resolve().parents[1]
SHARDS = 200


def _ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print (or return) the timings in milliseconds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    split = split_dataset(load_dataset(f"seq:{args.data_root}/s3rec/Beauty.txt"))
    examples = build_examples(split, task="next_item", stage="test", max_len=50)
    first = _ms(examples.exclusions)
    shards = [examples.subset(np.array([u])) for u in range(1, SHARDS + 1)]
    per_shard = _ms(lambda: [s.exclusions() for s in shards]) / SHARDS

    cdr = split_dataset(load_dataset(f"cdr:{args.data_root}/DisenCDR-sport_cloth"))
    cdr_ex = build_examples(cdr, task="cdr", stage="train", max_len=10)
    sampler = UniformNegativeSampler(cdr, seed=0)

    def batches(users):
        return list(iterate_batches(cdr_ex.subset(users), batch_size=64, num_negatives=10, sampler=sampler))

    cdr_first = _ms(lambda: batches(np.array([1])))
    cdr_per_shard = _ms(lambda: [batches(np.array([u])) for u in range(2, SHARDS + 2)]) / SHARDS
    result = {
        "beauty_exclusions_first_ms": round(first, 2),
        "beauty_exclusions_per_shard_ms": round(per_shard, 3),
        "disencdr_cdr_batches_first_ms": round(cdr_first, 2),
        "disencdr_cdr_batches_per_shard_ms": round(cdr_per_shard, 3),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:36s} {value}")
    return result


if __name__ == "__main__":
    main()
