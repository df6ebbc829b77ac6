"""Score the runs of a results table again, from their training states, on another protocol.

Usage::

    python simulations/reevaluate.py simulations/configs/lastfm_next.toml --state-dir runs/state \\
        --protocol sampled-99 --negatives-file "{data_root}/s3rec/LastFM_sample.txt" [--data-root ../shared/data]

For every row and seed of the table whose state file ``run_table.py --state-dir`` left in
``--state-dir``, the best weights are scored on valid and test (``fedrec evaluate``), e.g.
against a paper's own fixed negatives instead of our uniform draws. Writes
``simulations/results/<stem>_<tag>.json`` (per run) and ``.md`` (test mean ± std over
seeds), ``<tag>`` naming the protocol and the negatives file. Runs without a state file are
listed as missing, not guessed; runs still training are listed as unfinished.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedrec.compare import mean_cell, seeds_cell
from fedrec.config import build_config, load_toml
from fedrec.data import load_dataset
from fedrec.data.split import SplitConfig, split_dataset
from fedrec.errors import FedrecError
from fedrec.train import TrainConfig, evaluate_saved, train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "simulations"))
from run_table import _write, state_name  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Re-score the table's saved runs and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--state-dir", type=Path, required=True, help="where run_table.py --state-dir kept the states")
    parser.add_argument("--protocol", default="sampled-99", help="full, sampled-99 or sampled-999")
    parser.add_argument("--negatives-file", default="", help="fixed negatives per user; may start with {data_root}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out-dir", type=Path, default=ROOT / "simulations" / "results",
                        help="where the .json and .md go (default simulations/results)")
    args = parser.parse_args(argv)
    try:
        cfg = load_toml(args.config)
        split = split_dataset(load_dataset(cfg["data"].replace("{data_root}", args.data_root)),
                              build_config(SplitConfig, cfg.get("split", {}), where="split"))
        negatives = args.negatives_file.replace("{data_root}", args.data_root)
        tag = args.protocol + ("-" + Path(negatives).stem if negatives else "")
        results, missing, unfinished = {}, [], []
        for entry in cfg["runs"]:
            row = entry["name"]
            for seed in args.seeds:
                path = args.state_dir / state_name(args.config.stem, row, seed)
                if entry["model"] in ("popularity", "user_ctr"):  # no state: nothing trained, score it afresh
                    opts = {**cfg.get("train", {}), **entry.get("train", {}), "protocol": args.protocol,
                            "negatives-file": negatives, "also-test": "", "progress": False, "seed": seed}
                    opts.pop("negatives_file", None)
                    r = train(entry["model"], split, task=cfg["task"], config=build_config(TrainConfig, opts, where="train"))
                    scores = {"valid": r["valid"], "test": r["test"]}
                    best = 0
                elif path.is_file():
                    r = evaluate_saved(path, split, protocols=[args.protocol], negatives_file=negatives,
                                       skip_unfinished=True)
                    if not r["finished"]:  # still training: its best epoch is not final
                        unfinished.append(f"{row}/seed{seed}")
                        continue
                    scores, best = r["by_protocol"][args.protocol], r["best_epoch"]
                else:
                    missing.append(f"{row}/seed{seed}")
                    continue
                results[f"{row}/seed{seed}"] = {"row": row, "seed": seed, "best_epoch": best, **scores}
                print(f"{row}/seed{seed}: test {scores['test']}", flush=True)
                if entry["model"] in ("popularity", "user_ctr"):
                    break  # deterministic: one seed is all seeds
    except FedrecError as exc:
        print(f"reevaluate: error: {exc}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"{args.config.stem}_{tag}.json"
    doc = {"config": str(args.config.resolve().relative_to(ROOT)) if args.config.resolve().is_relative_to(ROOT) else args.config.name,
           "protocol": args.protocol, "negatives_file": args.negatives_file, "missing": missing,
           "unfinished": unfinished, "runs": results}
    _write(out, json.dumps(doc, indent=1))
    text = markdown(cfg.get("title", args.config.stem), doc)
    _write(out.with_suffix(".md"), text)
    print(text, end="")
    return 0


def markdown(title: str, doc: dict) -> str:
    """The ``.md`` of a re-scored table (``doc`` is the JSON this script writes; ``title`` the
    table's title): test HR@10 / NDCG@10 per row, mean ± std over seeds, and the runs that
    were missing or unfinished."""
    lines = [f"### {title}: re-scored on {doc['protocol']}"
             + (f" with `{doc['negatives_file']}`" if doc["negatives_file"] else ""), "",
             "| model | test hr@10 | test ndcg@10 | seeds | best epochs |", "| --- | ---: | ---: | ---: | --- |"]
    rows: dict[str, list[dict]] = {}
    for run in doc["runs"].values():
        rows.setdefault(run["row"], []).append(run)
    for row, runs in rows.items():
        cells = [mean_cell([r["test"][m] for r in runs]) for m in ("hr@10", "ndcg@10")]
        lines.append(f"| {row} | {' | '.join(cells)} | {seeds_cell(len(runs))} | "
                     f"{', '.join(str(r['best_epoch']) for r in runs)} |")
    if doc["missing"]:
        lines += ["", f"No state file for: {', '.join(doc['missing'])}."]
    if doc["unfinished"]:
        lines += ["", f"Still training (not scored): {', '.join(doc['unfinished'])}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
