"""Clients that lie: attacks on federated MRFF and the robust aggregation that resists them.

Usage::

    python simulations/attacks.py [--data SPEC] [--clients 10] [--rounds 30] [--rows ROW ...]
        [--seed 0] [--out simulations/results/attacks.json] [--state-dir DIR]

Each row is one ``fedrec simulate`` run (in process, through the project's Flower apps) on
the same data, split, clients and seed, with the run options of :data:`ROWS`
(:mod:`fedrec.federated.robust`): no attack, an attack with no defence, and the attack with
each defence. ``attack-fraction`` is 0.2 in every row, the clean one included (its
malicious clients behave honestly), so every row is evaluated on the same honest users and
the same target item. Test AUC (with its error bound) at the best validation-AUC round,
and the target item's exposure ``er@10`` (the share of the honest users who never
interacted with it whose top 10 over the whole catalogue contains it) at that round and at
the last round.

Every row is written to ``--out`` as it finishes (its run options, protocol, valid/test
metrics, exposure, best round, seconds and the per-round history); ``attacks.md`` is
rendered from that file after each row. A row already there with the same configuration is
skipped, so an interrupted table resumes; with ``--state-dir`` a run also checkpoints every
5 rounds and resumes mid-run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from fedrec.files import merge_json_entry, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
DATA = "movielens:{data_root}/ml-100k/u.data"

#: row -> (label, run options)
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "clean": ("no attack", {"attack": "none"}),
    "promotion": ("item promotion, no defence", {"attack": "item-promotion"}),
    "promotion-median": ("item promotion + median", {"attack": "item-promotion", "robust": "median"}),
    "promotion-trimmed": ("item promotion + trimmed mean", {"attack": "item-promotion", "robust": "trimmed-mean"}),
    "promotion-krum": ("item promotion + Krum", {"attack": "item-promotion", "robust": "krum"}),
    "promotion-multikrum": ("item promotion + Multi-Krum", {"attack": "item-promotion", "robust": "multi-krum"}),
    "promotion-normbound": ("item promotion + norm bound", {"attack": "item-promotion", "robust": "norm-bound"}),
    "scale": ("scale x10, no defence", {"attack": "scale"}),
    "scale-median": ("scale x10 + median", {"attack": "scale", "robust": "median"}),
    "scale-normbound": ("scale x10 + norm bound", {"attack": "scale", "robust": "norm-bound"}),
    "scale-multikrum": ("scale x10 + Multi-Krum", {"attack": "scale", "robust": "multi-krum"}),
    "flip": ("label flip, no defence", {"attack": "label-flip"}),
    "flip-median": ("label flip + median", {"attack": "label-flip", "robust": "median"}),
    "flip-multikrum": ("label flip + Multi-Krum", {"attack": "label-flip", "robust": "multi-krum"}),
    "clean-median": ("no attack + median", {"attack": "none", "robust": "median"}),
}


def run_config(row: str, args: argparse.Namespace) -> dict[str, Any]:
    """The flat run config of one row (``data`` keeps ``{data_root}``)."""
    flat = {"data": args.data, "task": "ctr", "algorithm": "mrff", "shards": args.clients, "rounds": args.rounds,
            "eval-every": args.eval_every, "seed": args.seed, "attack-fraction": args.attack_fraction}
    flat.update(ROWS[row][1])
    flat.update(args.extra)
    return flat


def fingerprint(config: dict[str, Any]) -> str:
    """What a row's result depends on (a changed configuration re-runs it)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_row(flat: dict[str, Any], data_root: str, state: Path | None, progress: bool) -> dict[str, Any]:
    """Run one row; its result (metrics at the best round, exposure, history, timing)."""
    from fedrec.federated.runner import run_in_process
    from fedrec.federated.spec import parse_run_config

    real = {**flat, "data": flat["data"].replace("{data_root}", data_root)}
    # robust aggregation cannot average item rows over their readers (item-aggregation = auto
    # would give the defended rows 'all' and the undefended ones 'touched'): every row the same
    real = _with_defaults({"item-aggregation": "all", **real})
    if state is not None:
        state.mkdir(parents=True, exist_ok=True)
        real.update({"checkpoint-dir": str(state), "checkpoint-every": 5, "resume": (state / "server.pt").exists()})
    result = run_in_process(parse_run_config(real), progress=progress)
    evals = [h for h in result["history"] if "test" in h]
    last = evals[-1]["test"] if evals else {}
    return {"valid": result["valid"], "test": result["test"], "best_round": result["best_round"],
            "rounds_run": result["rounds"], "seconds": result["seconds"], "last_test": last,
            "attack": result.get("attack"),
            "curve": [[h["round"], h["test"].get("auc"), h["test"].get("er@10")] for h in evals],
            "history": result["history"]}


def _with_defaults(flat: dict[str, Any]) -> dict[str, Any]:
    """The per-dataset defaults ``fedrec simulate --data`` adds, under the row's own keys."""
    from fedrec.defaults import resolve

    return resolve(flat["data"], runtime="federated", user=flat).options


def markdown(results: dict[str, Any]) -> str:
    """The table of ``attacks.json`` (one line per row, in :data:`ROWS` order)."""
    cells = sorted(results.values(), key=lambda c: list(ROWS).index(c["row"]) if c["row"] in ROWS else len(ROWS))
    if not cells:
        return "### Attacks and defences\n\nNo row recorded yet.\n"
    first = cells[0]
    att = first.get("attack") or {}
    lines = ["### Attacks and defences: federated MRFF", "",
             f"`{first['config']['data']}`, CTR, federated MRFF, {first['config']['shards']} clients, "
             f"{first['config']['rounds']} rounds, seed {first['config']['seed']}; attack-fraction "
             f"{first['config']['attack-fraction']} (malicious clients {att.get('malicious-clients')}, left out of "
             f"evaluation in every row), target item {att.get('target')!r}. Test AUC ± its error bound at the best "
             "validation-AUC round; er@10 = share of the honest users who never interacted with the target whose "
             "top 10 over the catalogue contains it, at the best round and at the last. Rendered from "
             "`attacks.json`.", "",
             "| row | attack | defence | test AUC | ± | er@10 (best round) | er@10 (last round) | best round | s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in cells:
        t, last = c["test"], c.get("last_test", {})
        lines.append(f"| {ROWS.get(c['row'], (c['row'],))[0]} | {c['config'].get('attack', 'none')} | "
                     f"{c['config'].get('robust', 'none')} | {_f(t.get('auc'))} | {_f(t.get('auc-error-bound'))} | "
                     f"{_f(t.get('er@10'))} | {_f(last.get('er@10'))} | {c['best_round']} | {c['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def _f(x: Any, digits: int = 4) -> str:
    return "-" if x is None else f"{float(x):.{digits}f}"




def main(argv: list[str] | None = None) -> int:
    """Run the rows not yet recorded; write the JSON and its Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DATA, help="data spec; {data_root} is --data-root (default: %(default)s)")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"), help="where {data_root} points")
    parser.add_argument("--clients", type=int, default=10, help="clients (shards of users; default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=30, help="rounds per run (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=5, help="evaluate every N rounds (default: %(default)s)")
    parser.add_argument("--attack-fraction", type=float, default=0.2, help="malicious clients (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="run seed (default: %(default)s)")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to run (default: all)")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra run option for every row (e.g. model.groups=2)")
    parser.add_argument("--out", default=str(ROOT / "simulations" / "results" / "attacks.json"), help="result JSON")
    parser.add_argument("--state-dir", default="", help="checkpoint each run there (resumes mid-run)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from fedrec.config import parse_scalar

    extra = {}
    for item in args.extra:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE (got {item!r})")
        extra[key] = parse_scalar(value)
    args.extra = extra
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else {}
    for row in args.rows:
        flat = run_config(row, args)
        key = f"{row}/seed{args.seed}"
        fp = fingerprint(flat)
        if key in done and done[key].get("fingerprint") == fp:
            print(f"{key}: recorded, skipped", file=sys.stderr)
            continue
        state = Path(args.state_dir) / f"{row}-seed{args.seed}-{fp}" if args.state_dir else None
        print(f"{key}: running", file=sys.stderr)
        cell = {"row": row, "seed": args.seed, "config": flat, "fingerprint": fp,
                **run_row(flat, args.data_root, state, not args.no_progress)}
        done = merge_json_entry(out, key, cell)
        write_text_atomic(out.with_suffix(".md"), markdown(done))
        t = cell["test"]
        print(f"{key}: test auc {t.get('auc')} er@10 {t.get('er@10')} ({cell['seconds']:.0f} s)", file=sys.stderr)
    if done:
        write_text_atomic(out.with_suffix(".md"), markdown(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
