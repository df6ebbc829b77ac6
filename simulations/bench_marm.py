"""MARM's cache: hit rate, memory and compute per request, measured side by side (issue 17).

For each number of layers L, trains ``marm`` for ``--epochs`` on ``--data`` (the cache store
fills as training scores every impression), then serves the test impressions twice with the
same weights: from the cache store (each history item's lower-layer values looked up) and
recomputed (the history's lower layers computed again in the request, as a model without
the cache must). Reports, per L:

* ``hit_rate``: share of the serving lookups (history item x cached layer) found in the store;
* ``entries`` and ``megabytes`` of the store (float32 values, (L - 1) x dim per entry);
* ``flops_cached`` / ``flops_recomputed``: attention multiply-adds per scored impression at
  the test set's mean history length (:func:`fedrec.models.marm.flops_per_request`) and
  ``flops_saved`` (their ratio);
* ``ms_cached`` / ``ms_recomputed``: measured serving time per impression, both paths
  timed in the same run (``--repeat`` passes, the fastest kept);
* ``test_auc_cached`` / ``test_auc_recomputed``: what each path scores (they differ: cached
  values are as stale as the training step that wrote them).

``--json`` prints one object; ``--out FILE`` writes it (atomically).

Example::

    python simulations/bench_marm.py --data-root ../shared/data --json --out simulations/results/bench_marm.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import torch

from fedrec.files import write_text_atomic

DEFAULT_DATA = "kuaisar:{data_root}/KuaiSAR-R"


def _serve(model, examples, batch_size: int) -> tuple[np.ndarray, np.ndarray, float]:
    from fedrec.data.batching import iterate_batches

    probs, labels = [], []
    start = time.perf_counter()
    with torch.no_grad():
        for batch in iterate_batches(examples, batch_size=batch_size):
            probs.append(model.predict_ctr(batch).double().numpy())
            labels.append(batch["target_labels"][:, -1].numpy())
    return np.concatenate(probs), np.concatenate(labels), time.perf_counter() - start


def bench(data: str, *, layers: list[int], epochs: int, max_len: int, repeat: int, batch_size: int,
          seed: int, options: dict[str, Any]) -> dict[str, Any]:
    """Run the benchmark (module docstring) and return the JSON object."""
    from fedrec.data import load_dataset
    from fedrec.data.batching import build_examples
    from fedrec.data.split import split_dataset
    from fedrec.defaults import resolve
    from fedrec.metrics import auc
    from fedrec.models.base import ModelData
    from fedrec.models.marm import flops_per_request
    from fedrec.models.registry import create_model
    from fedrec.train import TrainConfig, train

    split = split_dataset(load_dataset(data))
    test = build_examples(split, task="ctr", stage="test", max_len=max_len)
    n_hist = float((test.input_rows >= 0).sum(1).mean())
    out: dict[str, Any] = {"data": data, "epochs": epochs, "max_len": max_len, "test_impressions": len(test),
                           "mean_history": round(n_hist, 2), "torch_threads": torch.get_num_threads(), "by_layers": {}}
    for L in layers:
        resolved = resolve(data, runtime="centralised", model="marm",
                           user={"epochs": epochs, **{f"model.{k}": v for k, v in {**options, "layers": L,
                                                                                       "max-len": max_len}.items()}})
        model_options = resolved.model_options()
        train_opts = {k.replace("-", "_"): v for k, v in resolved.options.items() if k != "task" and not k.startswith("model.")}
        result = train("marm", split, task="ctr", model_options=model_options,
                       config=TrainConfig(**{**train_opts, "seed": seed, "progress": False}), data_name=data)
        model = create_model("marm", ModelData.from_split(split), model_options, task="ctr")
        model.load_state_dict(result["model_state"])
        model.eval()
        row: dict[str, Any] = {"train_seconds": result["seconds"], "best_epoch": result["best_epoch"]}
        timings: dict[str, float] = {}
        for path in ("cached", "recomputed"):
            model.vmap_safe = path == "recomputed"  # no store: the history's values recomputed in the request
            best = float("inf")
            for _ in range(repeat):
                model.reset_cache_stats()
                probs, labels, seconds = _serve(model, test, batch_size)
                best = min(best, seconds)
            timings[path] = best
            row[f"test_auc_{path}"] = round(float(auc(labels, probs)), 6)
            if path == "cached":
                report = model.cache_report()
                row.update(hit_rate=None if report["hit_rate"] is None else round(report["hit_rate"], 4),
                           entries=report["entries"], megabytes=round(report["bytes"] / 2**20, 3))
        model.vmap_safe = False
        dim = int(model.cfg.dim)
        row["ms_cached"] = round(1000 * timings["cached"] / len(test), 4)
        row["ms_recomputed"] = round(1000 * timings["recomputed"] / len(test), 4)
        row["time_ratio"] = round(timings["recomputed"] / timings["cached"], 3)
        n = int(round(n_hist))
        row["flops_cached"] = flops_per_request(n, layers=L, dim=dim, cached=True)
        row["flops_recomputed"] = flops_per_request(n, layers=L, dim=dim, cached=False)
        row["flops_saved"] = round(row["flops_recomputed"] / row["flops_cached"], 3)
        out["by_layers"][str(L)] = row
    return out


def markdown_table(doc: dict[str, Any]) -> str:
    """The README table of a benchmark JSON object."""
    lines = ["| layers | hit rate | store entries | store MB | attention FLOPs / request, cached | recomputed | "
             "saved | ms / request, cached | recomputed | test AUC, cached | recomputed |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for L, r in doc["by_layers"].items():
        hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.4f}"
        lines.append(f"| {L} | {hit} | {r['entries']:,} | {r['megabytes']:.1f} | {r['flops_cached']:,} | "
                     f"{r['flops_recomputed']:,} | {r['flops_saved']:.2f}x | {r['ms_cached']:.3f} | "
                     f"{r['ms_recomputed']:.3f} | {r['test_auc_cached']:.4f} | {r['test_auc_recomputed']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help=f"data spec (default {DEFAULT_DATA})")
    parser.add_argument("--data-root", default="../shared/data", help="replaces {data_root} in --data")
    parser.add_argument("--layers", type=int, action="append", help="numbers of layers (repeatable; default 1 2 4)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per model (default 3)")
    parser.add_argument("--max-len", type=int, default=65, help="history length (default 65)")
    parser.add_argument("--repeat", type=int, default=3, help="timed serving passes per path (default 3)")
    parser.add_argument("--batch-size", type=int, default=256, help="serving batch size (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="MARM model option")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", default=None, help="write the JSON object here")
    args = parser.parse_args(argv)
    options: dict[str, Any] = {}
    for item in args.set:
        if "=" not in item:
            print(f"error: --set {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        k, v = item.split("=", 1)
        options[k.strip()] = v.strip()
    from fedrec.errors import FedrecError

    try:
        doc = bench(args.data.replace("{data_root}", args.data_root), layers=args.layers or [1, 2, 4],
                    epochs=args.epochs, max_len=args.max_len, repeat=args.repeat, batch_size=args.batch_size,
                    seed=args.seed, options=options)
    except FedrecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    doc["data"] = args.data
    text = json.dumps(doc, indent=2) + "\n"
    if args.out:
        write_text_atomic(args.out, text)
    print(text if args.json else markdown_table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
