"""Cost of user-level differential privacy in a federated round, measured side by side.

For item catalogues of 12,000 and 70,000 items (a generated sequence file in which every
item occurs; MRFF with item-id embeddings, dim 64, max length 50, next item with one sampled
negative; one shard of ``--users`` users trained in chunks of ``--chunk``), each in its own
subprocess:

* ``seconds``: mean wall time of one ``client_update`` (the clients' local step on the same
  users and sequences) over ``--repeats`` rounds after one warm-up round, without DP and
  with DP (per-user clipping of every uploaded tensor + Gaussian noise + the accountant);
* ``peak_mb``: the subprocess's peak resident memory, and ``training_mb``: how far training
  raised it above the peak of the setup (data, model, global tables) — the part that
  grows with per-user copies;
* ``full_copies``: the same DP round with the engine's compact item tables switched off
  (every user trains a full copy of the item table, as before compaction): seconds and
  peak memory, to show what compaction saves.

Prints a table; with ``--json`` one object: ``dp_over_nondp`` (DP time / non-DP time at the
larger catalogue), ``dp_over_nondp_by_items``, ``seconds`` and ``peak_mb`` per catalogue and
mode. A benchmark, not a test: the numbers depend on the machine and its load.

    python simulations/bench_privacy.py [--users 128] [--chunk 16] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CATALOGUES = (12_000, 70_000)


def part(items: int, dp: bool, users: int, chunk: int, repeats: int, compact: bool = True) -> dict:
    """One measurement (run in its own process): mean seconds of a client round."""
    import resource
    import tempfile
    import time

    import numpy as np
    import torch

    from fedrec.data import load_dataset
    from fedrec.data.split import split_dataset
    from fedrec.federated import FederatedConfig, create_algorithm

    torch.set_num_threads(1)
    # a catalogue that really has `items` items: ceil(items / 50) users with 50 distinct items
    # each, covering every item once (the loaders keep only items that occur)
    rng = np.random.default_rng(0)
    perm = rng.permutation(items) + 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "catalogue.txt"
        path.write_text("".join(f"{u + 1} " + " ".join(map(str, perm[u * 50:(u + 1) * 50])) + "\n"
                                for u in range(-(-items // 50))))
        split = split_dataset(load_dataset(f"seq:{path}"))
    extra = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "dp_noise_seed": 0} if dp else {}
    alg = create_algorithm("mrff", split, task="next_item", config=FederatedConfig(chunk_size=chunk, **extra),
                           model_options={"item-repr": "id", "dim": 64, "max-len": 50})
    alg.compact = compact
    ids = np.arange(1, users + 1)
    shard = alg.make_shard(ids)
    g = alg.initial_global()
    state = alg.initial_local(ids)
    setup_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # data, model, tables
    alg.client_update(g, state, shard, round=1)  # warm-up
    times = []
    for r in range(2, 2 + repeats):
        t0 = time.perf_counter()
        alg.client_update(g, state, shard, round=r)
        times.append(time.perf_counter() - t0)
    table = sum(v.numel() for n, v in g.items() if "id_embedding" in n)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": float(np.mean(times)), "table_params": int(table), "peak_mb": peak,
            "setup_mb": setup_mb}


def _in_subprocess(*args) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'simulations')!r}); import bench_privacy as b; "
            f"print(json.dumps(b.part(*{list(args)!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"bench_privacy: part {args} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Measure and print (or ``--json``) the DP/non-DP ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    jobs = [(items, dp, True) for items in CATALOGUES for dp in (False, True)]
    jobs += [(items, True, False) for items in CATALOGUES]
    bar = tqdm(jobs, desc="bench_privacy", disable=args.json or tqdm is None) if tqdm else jobs
    res = {}
    for items, dp, compact in bar:
        key = (items, dp) if compact else (items, "full")
        res[key] = _in_subprocess(items, dp, args.users, args.chunk, args.repeats, compact)
    ratio = {str(i): round(res[(i, True)]["seconds"] / res[(i, False)]["seconds"], 3) for i in CATALOGUES}
    out = {
        "dp_over_nondp": ratio[str(max(CATALOGUES))],
        "dp_over_nondp_by_items": ratio,
        "seconds": {str(i): {"nondp": round(res[(i, False)]["seconds"], 3), "dp": round(res[(i, True)]["seconds"], 3)}
                    for i in CATALOGUES},
        "peak_mb": {str(i): {"nondp": round(res[(i, False)]["peak_mb"]), "dp": round(res[(i, True)]["peak_mb"])}
                    for i in CATALOGUES},
        "training_mb": {str(i): {"nondp": round(res[(i, False)]["peak_mb"] - res[(i, False)]["setup_mb"]),
                                 "dp": round(res[(i, True)]["peak_mb"] - res[(i, True)]["setup_mb"])}
                        for i in CATALOGUES},
        "full_copies": {str(i): {"dp_seconds": round(res[(i, "full")]["seconds"], 3),
                                 "dp_peak_mb": round(res[(i, "full")]["peak_mb"]),
                                 "dp_training_mb": round(res[(i, "full")]["peak_mb"] - res[(i, "full")]["setup_mb"])}
                        for i in CATALOGUES},
        "users": args.users, "chunk": args.chunk, "repeats": args.repeats,
    }
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{'items':>8} {'non-DP s':>9} {'DP s':>8} {'DP/non-DP':>10} {'peak MB non-DP / DP':>20}"
          f" {'training MB non-DP / DP':>24} {'full copies: DP s, peak / training MB':>38}")
    for i in CATALOGUES:
        s, m, f = out["seconds"][str(i)], out["peak_mb"][str(i)], out["full_copies"][str(i)]
        t = out["training_mb"][str(i)]
        print(f"{i:>8} {s['nondp']:>9.3f} {s['dp']:>8.3f} {ratio[str(i)]:>10.3f} {m['nondp']:>9} / {m['dp']:<8}"
              f" {t['nondp']:>11} / {t['dp']:<10} {f['dp_seconds']:>14.3f} s, {f['dp_peak_mb']} / {f['dp_training_mb']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
