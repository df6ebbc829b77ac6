"""Federated MRFF when clients fail: test AUC at several ``client-failure`` fractions.

Usage::

    python simulations/client_failures.py [--fractions 0 0.1 0.3] [--only 0.3] [--seeds 0 1]
        [--clients 10] [--rounds 60] [--config simulations/configs/fed_kuaisar.toml] [--row "federated MRFF"]
        [--data-root DIR] [--data SPEC] [--out-dir DIR]

Protocol: the ``--row`` row of the comparison file ``--config`` (default: federated MRFF of
``fed_kuaisar.toml`` on KuaiSAR-R, its defaults: 60 rounds, evaluated every 5 and at the
last, item-repr attributes, all users every round, one local Adam step at lr 0.1), run in
process (``fedrec simulate``'s runner) with ``--clients`` clients (shards of users, iid,
partition seed 0) and ``client-failure`` = each fraction: every training round exactly
``floor(fraction * clients)`` clients, drawn from the seed and the round, reply with an
error instead of an upload (:mod:`fedrec.federated.failures`); the round aggregates the
others, every client is still evaluated. Test AUC (pooled, with its error bound) at the
best validation AUC round, and the mean test AUC of the evaluations in the second half of
the rounds (the curve is noisy from one evaluation to the next). ``--seeds`` repeats each
fraction with other run seeds (seed 0 is the spec's default and not written into its
config; the key of another seed ends in ``/seedS``).

Each finished run is written to ``<out-dir>/client_failures.json`` (key
``client-failure=F``, or ``client-failure=F/seedS``: protocol, the run config, valid and test metrics, best round, seconds,
and a summary of the failures the history records) and ``client_failures.md`` is rendered
from that file; a run already there with the same configuration is skipped, so an
interrupted measurement resumes where it stopped. ``--rounds`` shrinks the runs (the table
says how many rounds each run had); ``--table`` only renders the Markdown again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from fedrec.files import merge_json_entry, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
STEM = "client_failures"
CONFIG = ROOT / "simulations" / "configs" / "fed_kuaisar.toml"


def run_config(config: Path, row: str, *, clients: int, rounds: int | None, fraction: float,
               data: str | None, data_root: str, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(flat run config to run, the same as recorded)``: the row's options as ``fedrec
    compare`` resolves them, with ``shards``, ``rounds``, ``client-failure`` and a seed other
    than the default 0 set; the recorded one names the data with ``{data_root}`` (no machine
    paths)."""
    from fedrec.compare import load_comparison, row_options
    from fedrec.errors import ConfigError

    cfg = load_comparison(config, data_root=data_root)
    if data:
        cfg["data"] = cfg["data_display"] = data
        cfg["data_root"] = None
    runs = {r["name"]: r for r in cfg["runs"]}
    if row not in runs or runs[row]["kind"] != "federated":
        known = ", ".join(n for n, r in runs.items() if r["kind"] == "federated")
        raise ConfigError(f"{config}: no federated row {row!r} (federated rows: {known})")
    flat = dict(row_options(cfg, runs[row]).options)
    flat.update({"data": cfg["data"], "shards": clients, "client-failure": fraction})
    if rounds is not None:
        flat["rounds"] = rounds
    if seed:
        flat["seed"] = seed
    recorded = {**flat, "data": cfg["data_display"]}
    return flat, recorded


def fingerprint(recorded: dict[str, Any]) -> str:
    """What a run's result depends on (a changed configuration re-runs it)."""
    return hashlib.sha256(json.dumps(recorded, sort_keys=True, default=str).encode()).hexdigest()[:16]


def failure_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """What the history records about failures: training rounds, replies that arrived and
    failed (in total and per reason), which clients failed how often, and whether every
    client answered every evaluation."""
    trained = [h["train"] for h in history if "train" in h]
    failed = [f for t in trained for f in t.get("failed", [])]
    evaluated = [h for h in history if "valid" in h]
    return {
        "train_rounds": len(trained),
        "uploads_arrived": sum(len(t.get("clients", [])) for t in trained),
        "uploads_failed": len(failed),
        "rounds_with_failures": sum(1 for t in trained if t.get("failed")),
        "reasons": dict(Counter(f["reason"] for f in failed)),
        "failures_per_client": {str(k): v for k, v in sorted(Counter(f["client"] for f in failed).items())},
        "users_trained_per_round": [t.get("users") for t in trained],
        "evaluation_rounds": len(evaluated),
        "evaluation_failures": sum(len(h.get("evaluate", {}).get("failed", [])) for h in evaluated),
    }


def run_one(flat: dict[str, Any], *, progress: bool) -> dict[str, Any]:
    """One run in process; its result dict."""
    from fedrec.federated.runner import run_in_process
    from fedrec.federated.spec import parse_run_config

    return run_in_process(parse_run_config(flat), progress=progress)


def _key(fraction: float, seed: int = 0) -> str:
    return f"client-failure={fraction:g}" + (f"/seed{seed}" if seed else "")


def late_mean(cell: dict[str, Any]) -> float | None:
    """Mean test AUC over the evaluations after the first half of the rounds (less noisy
    than the one best-validation round; a description of the curve, not a selection)."""
    half = cell["rounds"] / 2
    values = [h["test"]["auc"] for h in cell["history"] if "test" in h and h["round"] > half
              and h["test"].get("auc") is not None]
    return sum(values) / len(values) if values else None


def markdown(results: dict[str, Any]) -> str:
    """The table of ``client_failures.json``: one line per run (by fraction, then seed), Δ
    against client-failure 0 of the same seed and rounds."""
    cells = sorted(results.values(), key=lambda c: (c["client_failure"], c.get("seed", 0)))
    base = {(c.get("seed", 0), c["rounds"]): c for c in cells if c["client_failure"] == 0}
    lines = ["### Clients that fail: federated MRFF, KuaiSAR-R" if cells and "KuaiSAR" in cells[0]["data"]
             else "### Clients that fail: federated MRFF", ""]
    if cells:
        c0 = cells[0]
        lines += [f"Data `{c0['data']}`, {c0['clients']} clients (iid shards of users); protocol: {c0['protocol']}. "
                  "Each training round exactly floor(client-failure x clients) clients, drawn from the seed and the "
                  "round, reply with an error instead of an upload; the round aggregates the others; every client "
                  "is evaluated. Test AUC (pooled, ± its histogram error bound) at the best validation AUC round; "
                  "late mean: the mean test AUC of the evaluations in the second half of the rounds (a description "
                  "of the curve, less noisy than one round); Δ against client-failure 0 of the same seed. Rendered "
                  "from `client_failures.json` (`python simulations/client_failures.py`).", ""]
    lines += ["| client-failure | seed | failing clients per round | rounds | best round | valid AUC | test AUC | "
              "Δ test AUC | late mean test AUC | Δ late mean | test LogLoss | uploads arrived / failed | "
              "test users | seconds |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in cells:
        t, v, s = c["test"], c["valid"], c["failures"]
        b = base.get((c.get("seed", 0), c["rounds"]))
        other = b is not None and b is not c
        late, late_b = late_mean(c), late_mean(b) if b is not None else None
        delta = f"{t['auc'] - b['test']['auc']:+.4f}" if other else "-"
        delta_late = f"{late - late_b:+.4f}" if other and late is not None and late_b is not None else "-"
        lines.append(f"| {c['client_failure']:g} | {c.get('seed', 0)} | {c['failing_per_round']} of {c['clients']} | "
                     f"{c['rounds']} | {c['best_round']} | {v['auc']:.4f} | "
                     f"{t['auc']:.4f} ± {t.get('auc-error-bound', 0):.1g} | {delta} | "
                     f"{'-' if late is None else f'{late:.4f}'} | {delta_late} | {t['logloss']:.4f} | "
                     f"{s['uploads_arrived']} / {s['uploads_failed']} | {t['n']} | {c['seconds']:.0f} |")
    shrunk = sorted({c["rounds"] for c in cells if c["rounds"] != c.get("protocol_rounds", c["rounds"])})
    if shrunk:
        lines += ["", f"Runs with {', '.join(map(str, shrunk))} rounds are shortened (the protocol has "
                      f"{cells[0].get('protocol_rounds')}): not comparable to the full-length rows."]
    return "\n".join(lines) + "\n"




def main(argv: list[str] | None = None) -> int:
    """Run the fractions asked for (see the module docstring); returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Results: <out-dir>/client_failures.json and .md (resumable).")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.3],
                        help="client-failure values of the table (default: 0 0.1 0.3)")
    parser.add_argument("--only", type=float, nargs="+", help="run only these of --fractions now")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="run seeds (the failure draw, init, participation; default 0)")
    parser.add_argument("--clients", type=int, default=10, help="clients (shards of users; default 10)")
    parser.add_argument("--rounds", type=int, help="shrink the runs to this many rounds (default: the config's)")
    parser.add_argument("--config", type=Path, default=CONFIG, help="comparison file whose row is run")
    parser.add_argument("--row", default="federated MRFF", help="the federated row of --config to run")
    parser.add_argument("--data", help="another data spec instead of the config's (e.g. synthetic data)")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"),
                        help="what {data_root} in the config's data spec stands for (default: ../shared/data)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "simulations" / "results",
                        help="where client_failures.json and .md go (default: simulations/results)")
    parser.add_argument("--table", action="store_true", help="only render the Markdown from the JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    out_json = args.out_dir / f"{STEM}.json"
    if args.table:
        results = json.loads(out_json.read_text()) if out_json.exists() else {}
        write_text_atomic(out_json.with_suffix(".md"), markdown(results))
        return 0
    if args.clients < 1 or (args.rounds is not None and args.rounds < 1):
        parser.error("--clients and --rounds must be >= 1")
    if any(s < 0 for s in args.seeds):
        parser.error("--seeds must be >= 0")
    for f in [*args.fractions, *(args.only or [])]:
        if not 0 <= f < 1:
            parser.error(f"a client-failure fraction must be in [0, 1) (got {f})")
    todo = [(f, seed) for seed in args.seeds for f in args.fractions if args.only is None or f in args.only]
    if args.only and not todo:
        parser.error(f"--only {args.only}: none of --fractions {args.fractions}")
    from tqdm.auto import tqdm

    from fedrec.errors import FedrecError
    from fedrec.federated.failures import drawn_count

    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    bar = tqdm(todo, desc="client-failure runs", unit="run", disable=args.no_progress)
    for fraction, seed in bar:
        bar.set_postfix_str(_key(fraction, seed))
        try:
            flat, recorded = run_config(args.config, args.row, clients=args.clients, rounds=args.rounds,
                                        fraction=fraction, data=args.data, data_root=args.data_root, seed=seed)
            protocol_rounds = run_config(args.config, args.row, clients=args.clients, rounds=None, fraction=fraction,
                                         data=args.data, data_root=args.data_root)[0].get("rounds")
            fp = fingerprint(recorded)
            key = _key(fraction, seed)
            if key in results and results[key].get("fingerprint") == fp:
                continue
            result = run_one(flat, progress=not args.no_progress)
        except FedrecError as exc:
            print(f"client_failures: error: {exc}", file=sys.stderr)
            return 2
        cell = {"client_failure": fraction, "seed": seed, "clients": args.clients,
                "failing_per_round": drawn_count(fraction, args.clients), "data": recorded["data"],
                "row": args.row, "config_file": str(Path(args.config).resolve().relative_to(ROOT))
                if Path(args.config).resolve().is_relative_to(ROOT) else Path(args.config).name,
                "protocol": (f"{result['protocol']} AUC, selection {result['selection']}, "
                             f"eval-every {recorded.get('eval-every')}"),
                "protocol_rounds": protocol_rounds, "rounds": result["rounds"], "best_round": result["best_round"],
                "valid": result["valid"], "test": result["test"], "seconds": result["seconds"],
                "config": {**result["config"], "data": recorded["data"]},
                "failures": failure_summary(result["history"]), "history": result["history"],
                "fingerprint": fp}
        results = merge_json_entry(out_json, key, cell)
        write_text_atomic(out_json.with_suffix(".md"), markdown(results))
        print(f"{key}: test {cell['test']} (best round {cell['best_round']}, {cell['seconds']} s)",
              file=sys.stderr, flush=True)
    write_text_atomic(out_json.with_suffix(".md"), markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
