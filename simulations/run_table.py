"""Train several models over several seeds on one dataset and record a results table.

Usage::

    python simulations/run_table.py simulations/configs/kuaisar_ctr.toml [--seeds 0 1 2] [--only NAME ...]

The TOML file names the data, task and train options, and one ``[[runs]]`` entry per row
(``name``, ``model``, model options, and an optional ``[runs.train]`` table that overrides
``[train]`` for that row, e.g. a longer patience). Writes ``simulations/results/<stem>.json`` (every
run's valid/test metrics and history) and ``<stem>.md`` (test metrics at the best
validation epoch, mean ± standard deviation over seeds). Runs already in the JSON are
skipped, so an interrupted table resumes; several processes (``--only``) may fill one table.
With ``--state-dir DIR`` every run also keeps its training state there after each epoch
(``fedrec train --resume``), so a run interrupted mid-way resumes at its last epoch and ends
as an uninterrupted run would.

No per-dataset defaults (:mod:`fedrec.defaults`) apply here: a row trains with exactly the
keys its file gives over the library's own defaults, so that the tables recorded with this
script stay reproducible as they were run. ``fedrec compare`` applies the per-dataset
defaults, like ``fedrec train`` and ``fedrec simulate``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedrec.compare import mean_cell, seeds_cell, test_metric
from fedrec.config import build_config, load_toml
from fedrec.data import load_dataset
from fedrec.data.split import SplitConfig, split_dataset
from fedrec.files import merge_json_entry, write_text_atomic
from fedrec.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def state_name(stem: str, row: str, seed: int) -> str:
    """The file name of one run's training state under ``--state-dir``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{stem}-{row}-seed{seed}") + ".pt"




def population_note(results: dict) -> str:
    """`` Evaluated: N of U users at test (rule).`` from the runs' ``population`` (empty for
    results recorded before it existed)."""
    pops = [r["population"] for r in results.values() if r.get("population")]
    if not pops:
        return ""
    pop = pops[0]
    return f" Evaluated: {pop['test']['users']} of {pop['users']} users at test ({pop['rule']})."


def markdown(results: dict, metrics: list[str], header: str) -> str:
    """Mean ± std over seeds of each row's test metrics (one seed: the value alone), as a
    Markdown table."""
    lines = [header, "", "| model | " + " | ".join(f"test {m}" for m in metrics) + " | seeds | best epochs |",
             "| --- | " + " | ".join("---:" for _ in metrics) + " | ---: | --- |"]
    rows: dict[str, list[dict]] = {}
    for key, run in results.items():
        rows.setdefault(run["row"], []).append(run)
    for row, runs in rows.items():
        cells = []
        for m in metrics:
            vals = [v for v in (test_metric(r, m) for r in runs) if v is not None]
            cells.append(mean_cell(vals))
        epochs = ", ".join(str(r["best_epoch"]) for r in runs)
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {seeds_cell(len(runs))} | {epochs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the table described by a TOML file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", help="run only these row names")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--state-dir", type=Path, help="keep each run's training state here, to resume mid-run")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "simulations" / "results",
                        help="where <stem>.json and <stem>.md go (default simulations/results)")
    args = parser.parse_args(argv)
    cfg = load_toml(args.config)
    data = cfg["data"].replace("{data_root}", args.data_root)
    task = cfg["task"]
    split = split_dataset(load_dataset(data), build_config(SplitConfig, cfg.get("split", {}), where="split"))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out_json = args.out_dir / f"{args.config.stem}.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    for entry in cfg["runs"]:
        entry = dict(entry)
        row, model = entry.pop("name"), entry.pop("model")
        row_train = entry.pop("train", {})  # per-row overrides of [train], e.g. a longer patience
        if args.only and row not in args.only:
            continue
        for seed in args.seeds:
            key = f"{row}/seed{seed}"
            if key in results:
                continue
            resume = ""
            if args.state_dir is not None:
                args.state_dir.mkdir(parents=True, exist_ok=True)
                resume = str(args.state_dir / state_name(args.config.stem, row, seed))
            train_opts = {**cfg.get("train", {}), **row_train, "seed": seed, "progress": False, "resume": resume}
            negatives = {k: train_opts[k] for k in ("negatives-file", "negatives_file") if k in train_opts}
            for k, v in negatives.items():  # a data file: named with {data_root}, like `data`
                train_opts[k] = str(v).replace("{data_root}", args.data_root)
            train_cfg = build_config(TrainConfig, train_opts, where="train")
            def log_epoch(rec, key=key):  # one line per epoch, so long runs can be followed
                print(f"{key} epoch {rec['epoch']} loss {rec['loss']} valid {rec['valid']}", file=sys.stderr, flush=True)

            r = train(model, split, task=task, model_options=entry, config=train_cfg, data_name=cfg["data"],
                      on_epoch=log_epoch)
            r.pop("model_state")
            if negatives:  # results name the file as the config does, not by this machine's path
                r["train"]["negatives_file"] = next(iter(negatives.values()))
            r["row"] = row
            results = merge_json_entry(out_json, key, r)
            print(f"{key:28s} valid {r['valid']} test {r['test']} best epoch {r['best_epoch']} ({r['seconds']} s)",
                  flush=True)
    text = table_markdown(cfg, args.config.stem, results)
    _write(out_json.with_suffix(".md"), text)
    print(text)
    return 0


def table_markdown(cfg: dict, stem: str, results: dict) -> str:
    """The ``<stem>.md`` of a table: its title, data, task and protocol, and :func:`markdown`
    of the recorded runs (``cfg`` is the TOML file as read, ``stem`` its file name's stem)."""
    task = cfg["task"]
    metrics = cfg.get("metrics", ["auc", "logloss"] if task == "ctr" else ["hr@10", "ndcg@10"])
    header = f"### {cfg.get('title', stem)}\n\nData `{cfg['data']}`, task {task}, " \
             f"protocol {'pooled CTR' if task == 'ctr' else cfg.get('train', {}).get('protocol', 'full')}; " \
             "test at the best validation epoch." + population_note(results)
    return markdown(results, metrics, header)


if __name__ == "__main__":
    sys.exit(main())
