"""Does CRM's serving condition control what it retrieves? (issue 17, CRM's relative claim)

For each seed, trains ``crm`` once with ``fedrec train``'s resolved defaults on ``--data``
(validation selects the epoch), then evaluates the *test* users under each serving
condition (model option ``serve``; training does not depend on it):

* ``hr@10`` / ``ndcg@10`` (full ranking, the user's seen items excluded) of the held-out item;
* ``top10_value``: the mean, over users, of the average training-set value (the condition
  column: rating, or a watch-time-like ``value``) of the 10 items retrieved, each item's value
  averaged over the training rows of all users who consumed it — the "target" of what is
  retrieved;
* ``hit_value``: the mean held-out value among the users whose held-out item is in their
  top 10 (which held-out interactions the condition finds).

The claim holds when a higher served condition gives a higher ``top10_value`` (and
``hit_value``). Writes ``<out>/<name>.json`` (per seed and condition, plus mean and std
over seeds) and ``<out>/<name>.md``. Finished seeds are kept and skipped on a rerun;
``--state-dir`` keeps each seed's training state so an interrupted seed resumes.

``--tower dt`` measures CRM's Decision-Transformer variant (CRM-DT, model option ``tower``)
instead, into ``ml100k_crm_dt_control`` by default; the JSON has the same shape (the tower is
in each run's ``resolved`` record).

Example::

    python simulations/crm_control.py --data-root ../shared/data --seed 0 --seed 1 --seed 2
    python simulations/crm_control.py --data-root ../shared/data --tower dt --seed 0 --seed 1 --seed 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrec.files import write_text_atomic

DEFAULT_DATA = "movielens:{data_root}/ml-100k?implicit=true"
SERVES = ("min", "mean", "max", "1", "5", "min,mean,max")
TOWERS = ("concat", "dt")
#: the default output stem of each tower
NAMES = {"concat": "ml100k_crm_control", "dt": "ml100k_crm_dt_control"}


def item_values(split) -> np.ndarray:
    """``(n_items + 1,)`` mean training value of every item (NaN where it has none)."""
    from fedrec.data.split import TRAIN

    column = split.value if split.value is not None else split.rating
    rows = (split.part == TRAIN) & ~np.isnan(column)
    total = np.bincount(split.item[rows], weights=column[rows], minlength=split.n_items + 1)
    count = np.bincount(split.item[rows], minlength=split.n_items + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def control_metrics(model, examples, values: np.ndarray, *, batch_size: int = 512, k: int = 10) -> dict[str, float]:
    """HR/NDCG@k (full ranking, seen items excluded) and the value of what is retrieved."""
    from fedrec.data.batching import iterate_batches

    model.eval()
    indptr, indices = examples.exclusions()
    hits, ndcg, top_values, hit_values = [], [], [], []
    key = "target_values" if examples.split.value is not None else "target_ratings"
    start = 0
    with torch.no_grad():
        for batch in iterate_batches(examples, batch_size=batch_size):
            scores = model.score_all(batch).double().numpy()
            scores[:, 0] = -np.inf
            n = scores.shape[0]
            for r in range(n):
                seen = indices[indptr[start + r]:indptr[start + r + 1]]
                scores[r, seen] = -np.inf
            target = batch["target_items"][:, -1].numpy()
            target_score = scores[np.arange(n), target].copy()
            scores[np.arange(n), target] = target_score  # the target is never excluded
            rank = (scores > target_score[:, None]).sum(1)
            top = np.argpartition(-scores, k, axis=1)[:, :k]
            hit = rank < k
            hits.append(hit)
            ndcg.append(np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0))
            top_values.append(np.nanmean(values[top], axis=1))
            hit_values.append(np.where(hit, batch[key][:, -1].numpy(), np.nan))
            start += n
    hit_all = np.concatenate(hits)
    hv = np.concatenate(hit_values)
    return {f"hr@{k}": float(hit_all.mean()), f"ndcg@{k}": float(np.concatenate(ndcg).mean()),
            "top10_value": float(np.nanmean(np.concatenate(top_values))),
            "hit_value": float(np.nanmean(hv)) if np.isfinite(hv).any() else None,
            "users": int(len(hit_all))}


def run_seed(data: str, seed: int, *, serves: tuple[str, ...], state_dir: Path | None, user: dict[str, Any]) -> dict[str, Any]:
    """Train CRM for ``seed`` and evaluate the test users under every serving condition."""
    from fedrec.config import build_config
    from fedrec.data import load_dataset
    from fedrec.data.batching import build_examples
    from fedrec.data.split import split_dataset
    from fedrec.defaults import resolve
    from fedrec.models.base import ModelData
    from fedrec.models.registry import create_model
    from fedrec.train import TrainConfig, train

    resolved = resolve(data, runtime="centralised", model="crm", user=user)
    task = resolved.options.get("task", "next_item")
    split = split_dataset(load_dataset(data))
    train_opts = {k: v for k, v in resolved.options.items() if k != "task" and not k.startswith("model.")}
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        tower = resolved.model_options().get("tower", "concat")
        train_opts["resume"] = str(state_dir / (f"crm_seed{seed}.pt" if tower == "concat" else f"crm_{tower}_seed{seed}.pt"))
    cfg = build_config(TrainConfig, {**train_opts, "seed": seed}, where="train")
    result = train("crm", split, task=task, model_options=resolved.model_options(), config=cfg, data_name=data)
    state = result.pop("model_state")
    values = item_values(split)
    test = build_examples(split, task=task, stage="test", max_len=int(resolved.model_options().get("max-len", 50)))
    per_serve, column = {}, ""
    for serve in serves:
        model = create_model("crm", ModelData.from_split(split), {**resolved.model_options(), "serve": serve}, task=task)
        model.load_state_dict(state)
        column = model.column
        per_serve[serve] = control_metrics(model, test, values)
    return {"seed": seed, "best_epoch": result["best_epoch"], "epochs_run": result["epochs_run"],
            "seconds": result["seconds"], "valid": result["valid"], "test": result["test"],
            "resolved": resolved.record(), "column": column, "serve": per_serve}


def summary(runs: dict[str, Any], serves: tuple[str, ...]) -> dict[str, Any]:
    """Mean and std over seeds of every metric, per serving condition."""
    out: dict[str, Any] = {}
    for serve in serves:
        rows = [r["serve"][serve] for r in runs.values() if serve in r["serve"]]
        out[serve] = {}
        for key in ("hr@10", "ndcg@10", "top10_value", "hit_value"):
            vals = [r[key] for r in rows if r.get(key) is not None]
            if vals:
                out[serve][key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)) if len(vals) > 1 else None,
                                   "seeds": len(vals)}
    return out


def tower_of(doc: dict[str, Any]) -> str:
    """The CRM tower the runs of ``doc`` trained (``concat`` where none was given)."""
    towers = {str(r.get("resolved", {}).get("options", {}).get("model.tower", "concat")) for r in doc["runs"].values()}
    return ",".join(sorted(towers)) or "concat"


def markdown(doc: dict[str, Any]) -> str:
    """The result table (rendered from the JSON)."""
    def cell(m: dict[str, Any] | None, digits: int) -> str:
        if not m:
            return "-"
        std = f" ± {m['std']:.{digits}f}" if m.get("std") is not None else ""
        return f"{m['mean']:.{digits}f}{std}"

    seeds = sorted(r["seed"] for r in doc["runs"].values())
    model = {"concat": "CRM", "dt": "CRM-DT"}.get(tower_of(doc), f"CRM (tower {tower_of(doc)})")
    lines = [f"{model} on `{doc['data']}`, test users, full ranking; seeds {', '.join(map(str, seeds))} "
             f"({doc['column']} as the condition)", "",
             "| served condition | HR@10 | NDCG@10 | mean value of the top 10 | mean held-out value of hits |",
             "| --- | --- | --- | --- | --- |"]
    for serve, m in doc["summary"].items():
        lines.append(f"| `{serve}` | {cell(m.get('hr@10'), 4)} | {cell(m.get('ndcg@10'), 4)} | "
                     f"{cell(m.get('top10_value'), 3)} | {cell(m.get('hit_value'), 3)} |")
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA, help=f"data spec (default {DEFAULT_DATA})")
    parser.add_argument("--data-root", default="../shared/data", help="replaces {data_root} in --data")
    parser.add_argument("--seed", type=int, action="append", help="seeds (repeatable; default 0 1 2)")
    parser.add_argument("--serve", action="append", help=f"serving conditions (repeatable; default {' '.join(SERVES)})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="training or model.KEY options over the defaults (repeatable)")
    parser.add_argument("--out", default="simulations/results", help="output folder")
    parser.add_argument("--tower", default="concat", choices=TOWERS,
                        help="CRM's user tower (model option tower): concat (default) or dt (CRM-DT)")
    parser.add_argument("--name", default=None,
                        help=f"output file stem (default {NAMES['concat']}, with --tower dt {NAMES['dt']})")
    parser.add_argument("--state-dir", default=None, help="folder of per-seed training states (resumable)")
    args = parser.parse_args(argv)
    seeds = args.seed if args.seed is not None else [0, 1, 2]
    serves = tuple(args.serve) if args.serve else SERVES
    data = args.data.replace("{data_root}", args.data_root)
    user: dict[str, Any] = {}
    for item in args.set:
        if "=" not in item:
            print(f"error: --set {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        key, value = item.split("=", 1)
        user[key.strip()] = value.strip()
    if args.tower != "concat":
        if user.get("model.tower", args.tower) != args.tower:
            print(f"error: --tower {args.tower} and --set model.tower={user['model.tower']} disagree", file=sys.stderr)
            return 2
        user["model.tower"] = args.tower
    tower = str(user.get("model.tower", "concat"))
    name = args.name or NAMES.get(tower, f"ml100k_crm_{tower}_control")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    doc: dict[str, Any] = {"data": args.data, "runs": {}}
    if path.exists():
        doc = json.loads(path.read_text())
    from fedrec.errors import FedrecError

    try:
        for seed in seeds:
            if f"seed{seed}" in doc["runs"] and all(s in doc["runs"][f"seed{seed}"]["serve"] for s in serves):
                continue
            doc["runs"][f"seed{seed}"] = run_seed(data, seed, serves=serves,
                                                  state_dir=Path(args.state_dir) if args.state_dir else None, user=user)
            doc["column"] = doc["runs"][f"seed{seed}"]["column"]
            doc["summary"] = summary(doc["runs"], serves)
            _atomic_write(path, json.dumps(doc, indent=2, sort_keys=False) + "\n")
    except FedrecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not doc["runs"]:
        return 0
    doc["summary"] = summary(doc["runs"], serves)
    _atomic_write(path, json.dumps(doc, indent=2) + "\n")
    _atomic_write(out / f"{name}.md", markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
