"""Every registered model, and one federated round, on a device against the CPU (issue 18).

``python simulations/check_device.py DEVICE`` (``cuda``, ``cuda:1``, ``mps``, ``cpu``, ``auto``)
runs, for every registered model and every task it supports, on small synthetic data:

1. **evaluation**: a model trained on the CPU for ``--epochs`` is scored on the CPU and on
   DEVICE with the same weights; the metrics must agree within ``--eval-tol`` (float
   rounding only: the same weights, the same candidates);
2. **training**: the same model trained from the same seed on DEVICE; its test metric is
   compared with the CPU run's (``--train-tol``: with dropout off both runs follow the same
   path up to float rounding, but rounding differences grow over epochs, and models that
   draw noise on the device, DimeRec's diffusion, draw other numbers there), and the
   training time of both is reported with its ratio (the speed-up);
3. **one federated round** of the vectorised engine for every trainable model (``mrff`` for
   MRFF, with its groups; ``pfedrec`` for MF, with its personalised scoring; else
   ``fedavg``): the CPU's and DEVICE's new global parameters must agree within
   ``--eval-tol`` relative to the update's size, and so must the test metrics each side's
   clients compute with their own models. The round uses plain SGD: its update is linear in the
   gradient, so float rounding stays rounding (Adam's first step, ``lr * g / (|g| + eps)``,
   turns a rounding-level difference in a near-zero gradient into a difference of order
   ``lr``: on an H200 that alone gave relative differences of 5e-4 to 8e-2 for models that draw no
   noise on the device). Models that draw
   their training noise on the device (:data:`DEVICE_RANDOM`) are run and timed, not compared.
   Federated UniCDR (one client per domain) is not
   in it: its silo clients train through the centralised trainer, which check 2 covers.

On the CPU itself (``cpu``) it is a self-check of the device code paths (every tensor moved
where the model is), not a comparison. A device this machine lacks is a one-line error. The
report is printed as a table and written as JSON to ``--out`` (default
``simulations/results/check_device_<device>.json``); the exit status is 1 when any check
fails.

Example::

    python simulations/check_device.py cuda --epochs 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

#: small options (those a model's config knows are used); dropout off so both devices train alike
SMALL = {"dim": 16, "field-dim": 4, "layers": 2, "max-len": 8, "dropout": 0.0}
DATA = {
    "single": "synthetic:users=60,items=80,groups=2,min_len=6,max_len=12,seed=1",
    "domains": "synthetic:users=60,items=80,groups=2,min_len=6,max_len=12,seed=1,domains=2,overlap=0.5",
    "rated": "synthetic:users=60,items=80,groups=2,min_len=6,max_len=12,seed=1,behaviours=2",
}
#: models whose training draws random numbers on the device (BERT4Rec's cloze masks, DimeRec's
#: diffusion steps and noise): another device draws other numbers, so their federated round is
#: run, timed and checked finite, not compared with the CPU's
DEVICE_RANDOM = ("bert4rec", "dimerec")
#: models that need a per-row value, and multi-domain data (as the model contract test)
NEEDS_RATING = ("crm",)
NEEDS_DOMAINS = ("moment_cross",)


def _options(name: str) -> dict[str, Any] | None:
    from fedrec.models.registry import MODELS

    config = MODELS.create(name).config
    if config is None:
        return None
    known = {f.name.replace("_", "-") for f in dataclasses.fields(config)}
    return {k: v for k, v in SMALL.items() if k in known}


def _data_kind(name: str, task: str) -> str:
    if task == "cdr" or name in NEEDS_DOMAINS:
        return "domains"
    return "rated" if name in NEEDS_RATING else "single"


def _metric(task: str) -> str:
    from fedrec.train import selection_metric

    return selection_metric(task)


def check_model(name: str, task: str, split, device: str, *, epochs: int) -> dict[str, Any]:
    """Evaluation and training of one (model, task) on the CPU and on ``device``."""
    from fedrec.data.batching import build_examples
    from fedrec.models.base import ModelData
    from fedrec.models.registry import create_model
    from fedrec.train import TrainConfig, evaluate, train

    cfg = dict(epochs=epochs, patience=epochs, batch_size=32, lr=1e-3, negatives=2, seed=0, progress=False)
    for where in ("cpu", device):  # warm-up (caches of the split, kernels): not timed
        train(name, split, task=task, model_options=_options(name),
              config=TrainConfig(**{**cfg, "epochs": 1, "patience": 1}, device=where))
    t0 = time.perf_counter()
    cpu = train(name, split, task=task, model_options=_options(name), config=TrainConfig(**cfg, device="cpu"))
    cpu_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dev = train(name, split, task=task, model_options=_options(name), config=TrainConfig(**cfg, device=device))
    dev_s = time.perf_counter() - t0
    metric = _metric(task)
    # the CPU-trained weights scored on both devices
    model = create_model(name, ModelData.from_split(split), _options(name), task=task)
    model.load_state_dict(cpu["model_state"])
    if hasattr(model, "prepare"):
        model.prepare(split)
    max_len = getattr(model, "eval_max_len", getattr(getattr(model, "cfg", None), "max_len", 1))
    test = build_examples(split, task=task, stage="test", max_len=max_len)
    on_cpu = evaluate(model, test, task=task)
    on_dev = evaluate(model.to(device), test, task=task)
    diffs = [abs(on_cpu[k] - on_dev[k]) for k in on_cpu if on_cpu[k] is not None and on_dev.get(k) is not None]
    return {"model": name, "task": task, "metric": metric,
            "eval_cpu": on_cpu[metric], "eval_device": on_dev[metric], "eval_max_diff": max(diffs) if diffs else 0.0,
            "train_cpu": cpu["test"][metric], "train_device": dev["test"][metric],
            "train_diff": abs((cpu["test"][metric] or 0.0) - (dev["test"][metric] or 0.0)),
            "seconds_cpu": round(cpu_s, 3), "seconds_device": round(dev_s, 3),
            "speedup": round(cpu_s / dev_s, 3) if dev_s > 0 else None}


#: the federated algorithm each model is checked with (its own where it has one)
ALGORITHM_OF = {"mrff": "mrff", "mf": "pfedrec"}


def check_federated(name: str, task: str, split, device: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One round of the vectorised engine (``mrff`` for MRFF, with its group path; ``pfedrec``
    for MF, with its personalised scoring; else ``fedavg``) on the CPU and on ``device``, from
    the same initial parameters: the largest difference of the new global parameters,
    relative to the largest change the round made, and the test summaries each device's
    clients compute with their own models (``client_evaluate``: predict, routing, ranks)."""
    from fedrec.federated import FederatedConfig, create_algorithm

    algorithm = ALGORITHM_OF.get(name, "fedavg")
    out: dict[str, Any] = {"model": name, "task": task, "algorithm": algorithm}
    new, summaries = {}, {}
    for label, where in (("cpu", "cpu"), ("device", device)):
        cfg = FederatedConfig(lr=0.01, optimizer="sgd", negatives=2, chunk_size=16, seed=0, device=where)
        alg = create_algorithm(algorithm, split, task=task, model=name, model_options=options, config=cfg)
        users = np.arange(1, split.n_users + 1)
        g = alg.initial_global()
        state = alg.initial_local(users)
        shard = alg.make_shard(users)
        t0 = time.perf_counter()
        upload, state, _ = alg.client_update(g, state, shard, round=1)
        g2, counts, _ = alg.aggregate(g, [upload])
        out[f"seconds_{label}"] = round(time.perf_counter() - t0, 3)
        summaries[label] = alg.combine([alg.client_evaluate(g2, state, shard, stage="test", group_counts=counts)])
        new[label] = (g, g2)
    g, cpu_g2 = new["cpu"]
    _, dev_g2 = new["device"]
    change = max(float((cpu_g2[n] - g[n]).abs().max()) for n in g)
    diff = max(float((cpu_g2[n] - dev_g2[n]).abs().max()) for n in g)
    a, b = summaries["cpu"], summaries["device"]
    eval_diff = max((abs(a[k] - b[k]) for k in a if isinstance(a.get(k), float) and isinstance(b.get(k), float)
                     and not k.endswith("error-bound")), default=0.0)
    finite = all(bool(torch.isfinite(dev_g2[n]).all()) for n in dev_g2)
    out.update({"max_change": change, "max_diff": diff, "relative_diff": diff / change if change > 0 else 0.0,
                "eval_cpu": a, "eval_device": b, "eval_max_diff": eval_diff, "finite": finite,
                "compared": name not in DEVICE_RANDOM})
    return out


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("device", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs per model (default 2)")
    parser.add_argument("--eval-tol", type=float, default=1e-4, help="largest metric difference of the same weights")
    parser.add_argument("--train-tol", type=float, default=0.05,
                        help="largest test-metric difference of the two training runs")
    parser.add_argument("--models", nargs="*", help="only these models (default: every registered one)")
    parser.add_argument("--out", type=Path, help="JSON report (default simulations/results/check_device_<device>.json)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from fedrec.data import load_dataset
    from fedrec.data.split import split_dataset
    from fedrec.device import resolve_device
    from fedrec.errors import FedrecError
    from fedrec.files import write_json_atomic
    from fedrec.models.registry import MODELS

    try:
        device = str(resolve_device(args.device))
        names = args.models or MODELS.names()
        unknown = [n for n in names if n not in MODELS.names()]
        if unknown:
            raise FedrecError(f"--models: unknown model(s) {', '.join(unknown)} (known: {', '.join(MODELS.names())})")
        if args.epochs < 1:
            raise FedrecError(f"--epochs must be >= 1 (got {args.epochs})")
    except FedrecError as exc:
        print(f"check_device: error: {exc}", file=sys.stderr)
        return 2
    splits = {k: split_dataset(load_dataset(v)) for k, v in DATA.items()}
    rows, fed = [], []
    for name in names:
        spec = MODELS.create(name)
        for task in spec.model.tasks:
            split = splits[_data_kind(name, task)]
            row = check_model(name, task, split, device, epochs=args.epochs)
            row["ok"] = bool(row["eval_max_diff"] <= args.eval_tol and row["train_diff"] <= args.train_tol)
            rows.append(row)
            print(f"{name:14s} {task:9s} {row['metric']:8s} eval cpu {row['eval_cpu']:.4f} {device} "
                  f"{row['eval_device']:.4f} (diff {row['eval_max_diff']:.1e}); trained on cpu {row['train_cpu']:.4f} "
                  f"{device} {row['train_device']:.4f}; {row['seconds_cpu']:.1f} s vs {row['seconds_device']:.1f} s "
                  f"(x{row['speedup']}) {'ok' if row['ok'] else 'FAIL'}", flush=True)
            if task != "cdr" and name not in ("popularity", "user_ctr"):
                fsplit, options = split, _options(name)
                if name in NEEDS_DOMAINS:  # the cross branch reads other domains: federated without it, on one
                    fsplit, options = splits["single"], {**(options or {}), "cross": False}
                f = check_federated(name, task, fsplit, device, options)
                f["ok"] = bool(f["finite"] and (not f["compared"] or (f["relative_diff"] <= args.eval_tol
                                                                      and f["eval_max_diff"] <= args.eval_tol)))
                fed.append(f)
                print(f"{'':14s} {task:9s} {f['algorithm']} round: relative difference {f['relative_diff']:.1e}, "
                      f"evaluation {f['eval_max_diff']:.1e}{'' if f['compared'] else ' (device-drawn noise: not compared)'} "
                      f"({f['seconds_cpu']:.2f} s vs {f['seconds_device']:.2f} s) "
                      f"{'ok' if f['ok'] else 'FAIL'}", flush=True)
    report = {"device": device, "torch": torch.__version__, "epochs": args.epochs, "eval_tol": args.eval_tol,
              "train_tol": args.train_tol, "models": rows, "federated": fed,
              "all_ok": all(r["ok"] for r in rows) and all(f["ok"] for f in fed)}
    out = args.out or ROOT / "simulations" / "results" / f"check_device_{device.replace(':', '')}.json"
    write_json_atomic(report, out)  # missing folders are created
    failed = [f"{r['model']}/{r['task']}" for r in rows if not r["ok"]] + \
             [f"{f['model']}/{f['task']} (federated)" for f in fed if not f["ok"]]
    print(f"{len(rows)} model checks, {len(fed)} federated rounds on {device}: "
          f"{'all within tolerance' if not failed else 'FAILED: ' + ', '.join(failed)}; wrote {out}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
