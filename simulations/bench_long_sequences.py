"""Training-step time and peak memory of ELASTIC, KuaiFormer and SASRec on long sequences,
side by side, and DimeRec's sampling cost per user.

Usage::

    python simulations/bench_long_sequences.py [--lengths 50,200,800,2000] [--batch 8]
        [--steps 5] [--json] [--out simulations/results/bench_long_sequences.json]

Synthetic sequences (uniform items of a 5,000-item catalogue, every position real), the
same batch for every model at a length, width 64, 2 layers, 2 heads, dropout 0. Each
(model, length) runs in a fresh subprocess: 2 warm-up steps, then ``--steps`` timed
optimiser steps (Adam); its peak memory is the process's peak resident set minus its
resident set before the first step (model, optimiser and batch already built), in MB.

* ``sasrec``: causal full self-attention, BCE against one sampled negative (its paper's loss).
* ``elastic``: linear dispatcher attention, 8 experts, chunks of 16, product-key memory
  (16 x 16 slots, top 4); in-batch softmax.
* ``kuaiformer``: 4 query tokens after every raw position, in-batch softmax; at lengths over
  50 the oldest ``length - 50`` items are compressed (windows of 16 for the newest 64 of
  them, 64 before that, the remainder in one oldest window), the paper's scheme, so the
  Transformer sees at most ``n_windows + 50 + 4 * 50`` tokens.

The two retrieval models' in-batch pool is capped at 8 items here (their default is 2,048),
so that their loss costs about what SASRec's one-negative BCE does and the step time
compares the sequence encoders.

Prints the README's table (:func:`markdown_table`); with ``--json`` one object instead: per model ``step_s`` and ``peak_mb`` per length and
``growth_2000_over_200`` (step time at the longest over the second length, named for the
default lengths), plus ``dimerec_sampling``: milliseconds per user to score every item with
the guidance module alone and with 1, 5 and 20 reverse diffusion steps. Full attention's
step time grows quadratically in the length; the issue's goal for ELASTIC is a ratio <= 15
for 10x the length.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

N_ITEMS = 5000
WIDTH = {"dim": 64, "layers": 2, "heads": 2, "dropout": 0.0}
MODELS = ("sasrec", "elastic", "kuaiformer")


def kuaiformer_windows(length: int, raw: int = 50) -> str:
    """The compression windows of a ``length`` frame that keeps the newest ``raw`` items raw."""
    compressed = max(0, length - raw)
    n16 = min(4, compressed // 16)
    rest = compressed - 16 * n16
    n64, left = divmod(rest, 64)
    sizes = ([left] if left else []) + [64] * n64 + [16] * n16
    return ",".join(str(s) for s in sizes)


def _options(name: str, length: int) -> dict:
    opts = {**WIDTH, "max-len": length}
    if name == "sasrec":
        opts["next-loss"] = "bce"
    else:  # a pool of 8 in-batch items: the loss costs about SASRec's BCE, the step is the encoder
        opts["pool"] = 8
    if name == "kuaiformer":
        opts["windows"] = kuaiformer_windows(length)
    return opts


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _data():
    from fedrec.models.base import ModelData

    return ModelData(n_users=1, n_items=N_ITEMS, has_labels=False, user_features=None, item_features=None,
                     user_cardinalities=(), item_cardinalities=())


def measure_one(name: str, length: int, batch_size: int, steps: int) -> dict:
    """Step time (s) and peak MB of one (model, length), in this process."""
    import torch

    from fedrec.models.registry import create_model

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(length)
    batch = {"items": torch.randint(1, N_ITEMS + 1, (batch_size, length), generator=g),
             "target_items": torch.randint(1, N_ITEMS + 1, (batch_size, length), generator=g),
             "negatives": torch.randint(1, N_ITEMS + 1, (batch_size, length, 1), generator=g),
             "user": torch.ones(batch_size, dtype=torch.long)}
    batch["target_mask"] = torch.ones(batch_size, length, dtype=torch.bool)
    model = create_model(name, _data(), _options(name, length), task="next_item")
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        model.loss(batch, model(batch)).backward()
        opt.step()

    before = _rss_mb()
    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    return {"step_s": seconds, "peak_mb": max(0.0, peak - before)}


def dimerec_sampling(users: int = 256, length: int = 50) -> dict:
    """Milliseconds per user to score every item: the guidance alone and 1 / 5 / 20 steps."""
    import torch

    from fedrec.models.registry import create_model

    items = torch.randint(1, N_ITEMS + 1, (users, length), generator=torch.Generator().manual_seed(0))
    batch = {"items": items, "user": torch.ones(users, dtype=torch.long)}
    out = {}
    for label, opts in [("guidance only", {"diffusion": False}), ("1 step", {"sample-steps": 1}),
                        ("5 steps", {"sample-steps": 5}), ("20 steps", {"sample-steps": 20})]:
        torch.manual_seed(0)
        model = create_model("dimerec", _data(), {**WIDTH, "max-len": length, "steps": 20, **opts},
                             task="next_item").eval()
        with torch.no_grad():
            for _ in range(2):
                model.score_all(batch)
            start = time.perf_counter()
            for _ in range(10):
                model.score_all(batch)
        out[label] = round((time.perf_counter() - start) / 10 / users * 1000, 4)
    return out


LABELS = {"sasrec": "SASRec (full causal attention)",
          "elastic": "ELASTIC (8 experts, chunks of 16, memory 16 x 16)",
          "kuaiformer": "KuaiFormer (4 queries, compression)"}


def markdown_table(report: dict) -> str:
    """The README's table of a report (step time per length, growth, peak memory)."""
    lengths = [str(n) for n in report["lengths"]]
    lo, hi = (str(n) for n in report["growth_lengths"])
    head = ("| model | " + " | ".join(f"step {int(n):,}" for n in lengths) + f" | {int(hi):,} / {int(lo):,} | "
            f"peak MB at {int(lo):,} / {int(hi):,} |")
    lines = [head, "| --- |" + " ---: |" * (len(lengths) + 2)]
    for name, entry in report["models"].items():
        cells = " | ".join(f"{entry['step_s'][n]:.3f} s" for n in lengths)
        lines.append(f"| {LABELS.get(name, name)} | {cells} | {entry['growth_2000_over_200']:.1f}x | "
                     f"{entry['peak_mb'][lo]:.0f} / {entry['peak_mb'][hi]:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run every (model, length) in its own subprocess and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="50,200,800,2000", help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=8, help="sequences per training step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per (model, length)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON object to this file")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), args.batch, args.steps)))
        return {}
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths must be comma-separated integers (got {args.lengths!r})")
    if len(lengths) < 2 or any(n < 2 for n in lengths):
        parser.error("--lengths needs at least two lengths, each at least 2")
    if args.batch < 1 or args.steps < 1:
        parser.error("--batch and --steps must be positive")
    from tqdm import tqdm

    report: dict = {"lengths": lengths, "batch": args.batch, "steps": args.steps, "n_items": N_ITEMS,
                    "width": WIDTH, "threads": os.environ.get("OMP_NUM_THREADS") or os.cpu_count(), "models": {}}
    jobs = [(m, n) for m in MODELS for n in lengths]
    for name, length in tqdm(jobs, desc="model x length", disable=args.json):
        proc = subprocess.run([sys.executable, __file__, "--one", name, str(length), "--batch", str(args.batch),
                               "--steps", str(args.steps)], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"bench_long_sequences: {name} at length {length} failed: "
                             f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        entry = report["models"].setdefault(name, {"step_s": {}, "peak_mb": {}})
        entry["step_s"][str(length)] = round(result["step_s"], 5)
        entry["peak_mb"][str(length)] = round(result["peak_mb"], 1)
    lo = "200" if 200 in lengths else str(lengths[0])
    hi = "2000" if 2000 in lengths else str(lengths[-1])
    for entry in report["models"].values():
        entry["growth_2000_over_200"] = round(entry["step_s"][hi] / entry["step_s"][lo], 3)
    report["growth_lengths"] = [int(lo), int(hi)]
    report["dimerec_sampling_ms_per_user"] = dimerec_sampling()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(args.out)
    if args.json:
        print(json.dumps(report))
    else:
        print(markdown_table(report))
        print("DimeRec, ms per user to score every item:", report["dimerec_sampling_ms_per_user"])
    return report


if __name__ == "__main__":
    main()
