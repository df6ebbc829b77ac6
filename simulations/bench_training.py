"""Training throughput (sequences per second) of SASRec and MRFF on KuaiSAR-R, side by side.

Usage::

    python simulations/bench_training.py [--data-root ../shared/data] [--steps 30] [--json]

Both models use the same batches (batch 64, max_len 65, the MRFF reference widths) in the
same process; each is timed over ``--steps`` optimiser steps after 3 warm-up steps. MRFF is
timed twice: every group FFN on every user (``mrff``, the default) and each group FFN only on
its users (``mrff_dispatch``, option ``dispatch``). With ``--json`` prints one object: model
name -> sequences per second (plus ``mrff_over_sasrec`` and ``dispatch_over_dense``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fedrec.data import load_dataset
from fedrec.data.batching import build_examples, iterate_batches
from fedrec.data.split import split_dataset
from fedrec.models.base import ModelData
from fedrec.models.registry import create_model
from fedrec.train import TrainConfig, _optimizers

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {"item-repr": "attributes", "max-len": 65}


def throughput(name: str, data: ModelData, batches: list, steps: int, **extra) -> float:
    """Sequences per second over ``steps`` training steps (after 3 warm-up steps)."""
    torch.manual_seed(0)
    model = create_model(name, data, {**OPTIONS, **extra}, task="ctr")
    model.train()
    opts = _optimizers(model, TrainConfig())

    def step(batch):
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        model.loss(batch, model(batch)).backward()
        for opt in opts:
            opt.step()

    for batch in batches[:3]:
        step(batch)
    timed = [batches[i % len(batches)] for i in range(steps)]
    start = time.perf_counter()
    for batch in timed:
        step(batch)
    return sum(int(b["user"].shape[0]) for b in timed) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    """Measure and print the throughputs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    split = split_dataset(load_dataset(f"kuaisar:{args.data_root}/KuaiSAR-R"))
    data = ModelData.from_split(split)
    examples = build_examples(split, task="ctr", stage="train", max_len=65)
    batches = list(iterate_batches(examples, batch_size=64, shuffle=True, seed=0))
    result = {name: round(throughput(name, data, batches, args.steps), 1) for name in ("sasrec", "mrff")}
    result["mrff_dispatch"] = round(throughput("mrff", data, batches, args.steps, dispatch=True), 1)
    result["mrff_over_sasrec"] = round(result["mrff"] / result["sasrec"], 3)
    result["dispatch_over_dense"] = round(result["mrff_dispatch"] / result["mrff"], 3)
    print(json.dumps(result) if args.json else "\n".join(f"{k:18s} {v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
