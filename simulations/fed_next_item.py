"""Federated next item with the literature's classics: FedMF, PFedRec, FedAvg-SASRec and
federated MRFF beside popularity and centralised SASRec and MRFF, on MovieLens-100K, LastFM
and Amazon Video.

Usage::

    python simulations/fed_next_item.py [--datasets ml100k lastfm amazon-video] [--rows ...]
        [--seeds 0 1 2] [--rounds 100] [--epochs 200] [--state-dir DIR] [--data-root DIR]

Protocol (PFedRec's, Zhang et al. IJCAI 2023): every interaction is a positive (MovieLens:
all ratings); per user, leave-one-out by time (the latest interaction is test, the one before
it validation, the rest training); validation and test rank the held-out item against 99
uniform items the user never interacted with (``sampled-99``, fixed ``eval-seed``, the same
candidates for every row); HR@10 and NDCG@10 on test at the best validation NDCG@10 round
(federated) or epoch (centralised). Federated rows: one client per user, every user in
every round, 4 sampled negatives per training positive, ``--rounds`` rounds (100), evaluated
every ``--eval-every`` rounds (5) and at the last, each item row averaged over the users whose
update read it (``item-aggregation = touched``; the rows ``NAME-all`` average every row over
all of a round's users, as this table was first recorded), the engine's local update (one step of a
fresh Adam at lr 0.1 per user and round; FedMF and PFedRec on the ``mf`` model with their
defaults: dimension 32, PFedRec's user bias), sequence models with BCE against the 4
negatives. Centralised rows: the repository's next-item recipe (full cross-entropy, Adam
1e-3, batch 128, up to ``--epochs`` epochs with patience 20). MRFF also runs without its
private user FFN and with a residual around the gated FFN (``mrff-res``, ``mrff-fed-res``), and
federated with the private FFN and the residual (``mrff-fed-private-res``): on next item the
private FFN memorises each user's own training items (``configs/lastfm_mrff_private.toml``).

Every (dataset, row, seed) cell is written to ``<out-dir>/fed_next_item.json`` as it
finishes (data spec with ``{data_root}``, protocol, the configuration actually used, valid
and test metrics, best round or epoch, wall time, seconds per round or epoch), and
``fed_next_item.md`` is rendered from that file after each cell; a cell already there with
the same configuration is skipped. With ``--state-dir`` each cell's JSON also goes there, a
federated run checkpoints every 5 rounds and a centralised one keeps its training state, so
an interrupted cell resumes mid-run. ``--data NAME=SPEC`` adds (or replaces) a dataset.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.compare import mean_cell, seeds_cell
from fedrec.files import merge_json_entry, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
STEM = "fed_next_item"

#: name -> (label, data spec with {data_root})
DATASETS: dict[str, tuple[str, str]] = {
    "ml100k": ("MovieLens-100K, all ratings", "movielens:{data_root}/ml-100k/u.data?threshold=0"),
    "lastfm": ("LastFM (S3-Rec files)", "seq:{data_root}/s3rec/LastFM.txt"),
    "amazon-video": ("Amazon Video (PFedRec's file)",
                     ("csv:{data_root}/amazon-video-pfedrec/ratings.dat?header=false&user=0&item=1&rating=2&time=3"
                      "&ids=factorize")),
}

_SEQ = {"dim": 64, "heads": 2, "dropout": 0.5, "max-len": 50}
#: item rows averaged over the users that read them (see ``item-aggregation`` in
#: fedrec/federated/config.py; what ``auto``, the next-item formats' default, gives here)
_TOUCHED = {"item-aggregation": "touched"}
#: name -> (label, kind, model or algorithm, model options)
ROWS: dict[str, dict[str, Any]] = {
    "popularity": {"label": "popularity", "kind": "centralised", "model": "popularity", "options": {}},
    "sasrec": {"label": "SASRec (centralised)", "kind": "centralised", "model": "sasrec",
               "options": {**_SEQ, "next-loss": "ce"}},
    "mrff": {"label": "MRFF (centralised)", "kind": "centralised", "model": "mrff",
             "options": {**_SEQ, "next-loss": "ce"}},
    "fedmf": {"label": "FedMF", "kind": "federated", "algorithm": "fedmf", "options": {}, "run": _TOUCHED},
    "pfedrec": {"label": "PFedRec", "kind": "federated", "algorithm": "pfedrec", "options": {}, "run": _TOUCHED},
    "fedavg-sasrec": {"label": "FedAvg-SASRec", "kind": "federated", "algorithm": "fedavg", "model": "sasrec",
                      "options": dict(_SEQ), "run": _TOUCHED},
    "mrff-fed": {"label": "MRFF (federated)", "kind": "federated", "algorithm": "mrff", "options": dict(_SEQ),
                 "run": _TOUCHED},
    # issue 14, item 2: MRFF's private user FFN memorises the user's own training items, which
    # next-item evaluation never asks for (lastfm_mrff_private); without it, and with a
    # residual around the gated FFN as SASRec's block has
    "mrff-res": {"label": "MRFF (centralised), no private FFN + residual", "kind": "centralised", "model": "mrff",
                 "options": {**_SEQ, "next-loss": "ce", "user-ffn": False, "residual": True}},
    "mrff-fed-res": {"label": "MRFF (federated), no private FFN + residual", "kind": "federated", "algorithm": "mrff",
                     "options": {**_SEQ, "user-ffn": False, "residual": True}, "run": _TOUCHED},
    "mrff-fed-private-res": {"label": "MRFF (federated), private FFN + residual", "kind": "federated",
                             "algorithm": "mrff", "options": {**_SEQ, "residual": True}, "run": _TOUCHED},
    "mrff-fed-private-res-decay": {"label": "MRFF (federated), private FFN + residual, user-decay 1.0",
                                   "kind": "federated", "algorithm": "mrff",
                                   "options": {**_SEQ, "residual": True, "user-decay": 1.0}, "run": _TOUCHED},
    "mrff-fed-lowrank": {"label": "MRFF (federated), low-rank private FFN + residual, user-decay 0.1",
                         "kind": "federated", "algorithm": "mrff",
                         "options": {**_SEQ, "residual": True, "user-hidden": 8, "user-init": "zero",
                                     "user-scale": "history", "user-decay": 0.1}, "run": _TOUCHED},
}
#: the same federated rows with every item row averaged over all of a round's users (the
#: engine's ``item-aggregation = all``; how this table was first recorded): not run unless asked
#: for with ``--rows``
ALL_ROWS = {f"{name}-all": {**spec, "label": f"{spec['label']}, item rows over all users", "run": {}}
            for name, spec in ROWS.items() if spec["kind"] == "federated"}
#: shrinkage ablations of the private FFN, run on LastFM only (``--rows`` names them)
ABLATION_ROWS = ("mrff-fed-private-res-decay", "mrff-fed-lowrank")
DEFAULT_ROWS = [row for row in ROWS if row not in ABLATION_ROWS]
ROWS.update(ALL_ROWS)

PROTOCOL = {"split": "leave-one-out by time (valid = second latest, test = latest)",
            "ranking": "sampled-99 (uniform, never-interacted items, eval-seed 2024)",
            "selection": "valid ndcg@10", "clients": "one per user, all users every round",
            "training-negatives": 4}

#: published numbers (third-party transcription, MovieLens-1M, PFedRec protocol): not ours
PUBLISHED_ML1M = [("PFedRec", 0.7326, 0.4436), ("FedMF", 0.6772, 0.4090), ("FedNCF", 0.6054, 0.3417)]


def _write(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


def cell_config(row: str, data: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The configuration of one cell, as it is run and recorded (``data`` keeps ``{data_root}``)."""
    spec = ROWS[row]
    if spec["kind"] == "federated":
        flat = {"data": data, "task": "next_item", "algorithm": spec["algorithm"], "shards": 1,
                "rounds": args.rounds, "eval-every": args.eval_every, "fraction": 1.0, "negatives": 4,
                "protocol": "sampled-99", "eval-seed": 2024, "seed": seed}
        if "model" in spec:
            flat["model"] = spec["model"]
        flat.update(spec.get("run", {}))
        flat.update({f"model.{k}": v for k, v in spec["options"].items()})
        return {"kind": "federated", "run": flat}
    train = {"epochs": args.epochs, "patience": 20, "batch-size": 128, "lr": 0.001, "protocol": "sampled-99",
             "negatives": 4, "eval-seed": 2024, "seed": seed}
    return {"kind": "centralised", "data": data, "model": spec["model"], "options": dict(spec["options"]),
            "train": train}


def fingerprint(config: dict[str, Any]) -> str:
    """What a cell's result depends on (a changed configuration re-runs the cell)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_cell(config: dict[str, Any], data_root: str, state: Path | None, split_cache: dict) -> dict[str, Any]:
    """Run one cell; returns its result (metrics, best round or epoch, timing)."""
    def real(spec: str) -> str:
        return spec.replace("{data_root}", data_root)

    if config["kind"] == "federated":
        from fedrec.federated.runner import run_in_process
        from fedrec.federated.spec import parse_run_config

        flat = {**config["run"], "data": real(config["run"]["data"])}
        if state is not None:
            flat.update({"checkpoint-dir": str(state), "checkpoint-every": 5,
                         "resume": (state / "server.pt").exists()})
        result = run_in_process(parse_run_config(flat))
        rounds = max(1, int(result["rounds"]))
        curve = [[h["round"], h["valid"].get("ndcg@10")] for h in result["history"] if "valid" in h]
        return {"valid": result["valid"], "test": result["test"], "best_round": result["best_round"],
                "rounds_run": result["rounds"], "seconds": result["seconds"],
                "seconds_per_round": round(result["seconds"] / rounds, 3), "curve": curve}
    from fedrec.config import build_config
    from fedrec.data import load_dataset
    from fedrec.data.split import split_dataset
    from fedrec.train import TrainConfig, train

    data = real(config["data"])
    if data not in split_cache:
        split_cache.clear()
        split_cache[data] = split_dataset(load_dataset(data))
    opts = {**config["train"], "progress": False, "resume": str(state.with_suffix(".pt")) if state is not None else ""}
    result = train(config["model"], split_cache[data], task="next_item", model_options=config["options"],
                   config=build_config(TrainConfig, opts, where="train"), data_name=config["data"])
    epochs = max(1, int(result["epochs_run"]))
    curve = [[h["epoch"], h["valid"].get("ndcg@10")] for h in result["history"]]
    return {"valid": result["valid"], "test": result["test"], "best_epoch": result["best_epoch"],
            "epochs_run": result["epochs_run"], "seconds": result["seconds"],
            "seconds_per_epoch": round(result["seconds"] / epochs, 3), "curve": curve}




def _mean_std(values: list[float]) -> str:
    return mean_cell(values)  # one seed: the value alone


def markdown(results: dict[str, Any]) -> str:
    """The table of ``fed_next_item.json``: one block per dataset, one line per row (mean ±
    std over seeds), then the published ML-1M numbers, labelled as such."""
    lines = ["### Federated next item: FedMF, PFedRec, FedAvg-SASRec, MRFF vs centralised", "",
             "Protocol: " + "; ".join(f"{k} {v}" for k, v in PROTOCOL.items()) + ". Test HR@10 / NDCG@10 at the "
             "best validation round (federated) or epoch (centralised), mean ± std over seeds (one seed: the value "
             "alone); seconds per round "
             "(federated, evaluation rounds included) or per epoch (centralised), wall clock on the machine that "
             "ran the cell. Rendered from `fed_next_item.json`.", ""]
    by_data: dict[str, dict[str, list[dict]]] = {}
    for cell in results.values():
        by_data.setdefault(cell["dataset"], {}).setdefault(cell["row"], []).append(cell)
    order = list(ROWS)
    for dataset in sorted(by_data, key=lambda d: (list(DATASETS).index(d) if d in DATASETS else len(DATASETS), d)):
        rows = by_data[dataset]
        first = next(iter(rows.values()))[0]
        lines += [f"**{first.get('label', dataset)}** — `{first['data']}`", "",
                  ("| row | kind | test HR@10 | test NDCG@10 | seeds | best round/epoch | rounds/epochs run | "
                   "s per round/epoch |"),
                  "| --- | --- | ---: | ---: | ---: | --- | --- | ---: |"]
        for row in sorted(rows, key=lambda r: order.index(r) if r in order else len(order)):
            cells = sorted(rows[row], key=lambda c: c["seed"])
            hr = [c["test"]["hr@10"] for c in cells if c["test"].get("hr@10") is not None]
            ndcg = [c["test"]["ndcg@10"] for c in cells if c["test"].get("ndcg@10") is not None]
            best = ", ".join(str(c.get("best_round", c.get("best_epoch"))) for c in cells)
            run = ", ".join(str(c.get("rounds_run", c.get("epochs_run"))) for c in cells)
            trained = [c for c in cells if c.get("rounds_run", c.get("epochs_run"))]  # popularity: no epochs
            per = (f"{np.mean([c.get('seconds_per_round', c.get('seconds_per_epoch')) for c in trained]):.2f}"
                   if trained else "-")
            lines.append(f"| {ROWS.get(row, {}).get('label', row)} | {cells[0]['kind']} | {_mean_std(hr)} | "
                         f"{_mean_std(ndcg)} | {seeds_cell(len(cells))} | {best} | {run} | {per} |")
        lines.append("")
    lines += [("**Published, not ours** — MovieLens-1M, PFedRec protocol, as transcribed by a third party "
               "(to set beside a run of your own on ML-1M, e.g. `--data ml1m=movielens:PATH/ml-1m?threshold=0`):"), "",
              "| method | HR@10 | NDCG@10 |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {hr:.4f} | {ndcg:.4f} |" for name, hr, ndcg in PUBLISHED_ML1M]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the cells asked for (see the module docstring); returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), help=f"of {', '.join(DATASETS)} (and --data names)")
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS,
                        help=f"of {', '.join(ROWS)} (default: {', '.join(DEFAULT_ROWS)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, default=100, help="federated rounds")
    parser.add_argument("--eval-every", type=int, default=5, help="federated: evaluate every N rounds (and the last)")
    parser.add_argument("--epochs", type=int, default=200, help="centralised: most epochs (patience 20)")
    parser.add_argument("--data", action="append", default=[], metavar="NAME=SPEC",
                        help="add or replace a dataset (SPEC may use {data_root})")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--state-dir", type=Path, help="each cell's JSON and mid-run state, to resume an interrupted cell")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "simulations" / "results")
    args = parser.parse_args(argv)
    datasets = dict(DATASETS)
    for item in args.data:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            parser.error(f"--data expects NAME=SPEC (got {item!r})")
        datasets[name] = (name, spec)
    for name in args.datasets:
        if name not in datasets:
            parser.error(f"unknown dataset {name!r} (known: {', '.join(datasets)})")
    for name in args.rows:
        if name not in ROWS:
            parser.error(f"unknown row {name!r} (known: {', '.join(ROWS)})")
    if args.rounds < 1 or args.epochs < 1 or args.eval_every < 1:
        parser.error("--rounds, --epochs and --eval-every must be >= 1")
    out_json = args.out_dir / f"{STEM}.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    split_cache: dict = {}
    for dataset in args.datasets:
        label, data = datasets[dataset]
        for row in args.rows:
            for seed in args.seeds:
                key = f"{dataset}/{row}/seed{seed}"
                config = cell_config(row, data, seed, args)
                fp = fingerprint(config)
                saved = args.state_dir / f"{_safe(key)}.json" if args.state_dir is not None else None
                if key in results and results[key].get("fingerprint") == fp:
                    continue
                if saved is not None and saved.exists() and json.loads(saved.read_text()).get("fingerprint") == fp:
                    results = merge_json_entry(out_json, key, json.loads(saved.read_text()))
                    continue
                state = args.state_dir / f"{_safe(key)}-{fp}" if args.state_dir is not None else None
                start = time.perf_counter()
                outcome = run_cell(config, args.data_root, state, split_cache)
                cell = {"dataset": dataset, "label": label, "row": row, "kind": ROWS[row]["kind"], "seed": seed,
                        "data": data, "protocol": PROTOCOL, "config": config, **outcome,
                        "wall_seconds": round(time.perf_counter() - start, 2), "fingerprint": fp}
                if saved is not None:
                    _write(saved, json.dumps(cell, indent=1))
                results = merge_json_entry(out_json, key, cell)
                _write(out_json.with_suffix(".md"), markdown(results))
                print(f"{key}: test {cell['test']} ({cell['seconds']} s)", file=sys.stderr, flush=True)
    if results:
        _write(out_json.with_suffix(".md"), markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
