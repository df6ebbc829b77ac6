"""A run over a federation folder equals the one-dataset simulation it was cut from.

    python simulations/federation_equality.py movielens:../shared/data/ml-100k/u.data --clients 2 --rounds 3
    python simulations/federation_equality.py kuaisar:../shared/data/KuaiSAR-R --clients 2 --rounds 3 --name kuaisar

writes the folder with ``fedrec data partition SPEC --clients K --seed S`` (into a temporary
directory), runs ``fedrec simulate --federation DIR`` and ``fedrec simulate --data SPEC
--clients K --set partition-seed=S`` with the same bare defaults, and writes
``simulations/results/federation_equality_<name>.json``: both runs' histories, test metrics,
the largest absolute difference over every per-round and test metric, and the wall time of
each run (same process, one after the other). ``--table`` renders every recorded comparison
as ``simulations/results/federation_equality.md`` (the README's table).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fedrec.cli import _simulate_spec
from fedrec.data.federation import write_federation
from fedrec.federated.runner import run_in_process

RESULTS = Path(__file__).resolve().parent / "results"


def _numbers(result: dict) -> dict[str, float]:
    out = {}
    for h in result["history"]:
        for stage in ("train", "valid", "test"):
            for k, v in (h.get(stage) or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[f"round{h['round']}.{stage}.{k}"] = float(v)
    out.update({f"test.{k}": float(v) for k, v in result["test"].items() if isinstance(v, (int, float))})
    return out


def render_table(folder: Path = RESULTS) -> str:
    """The Markdown table of every ``federation_equality_*.json`` in ``folder``."""
    lines = ["| data | clients | rounds | metrics compared | max abs difference | test AUC ± bound (pooled) "
             "| test LogLoss | seconds (folder) | seconds (one dataset) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for path in sorted(folder.glob("federation_equality_*.json")):
        r = json.loads(path.read_text())
        t = r["federation"]["test"]
        auc = f"{t['auc']:.4f} ± {t['auc-error-bound']:.2g}" if "auc" in t else "-"
        loss = f"{t['logloss']:.4f}" if "logloss" in t else "-"
        data = r["spec"].replace("../shared/data/", "")
        lines.append(f"| `{data}` | {r['clients']} | {r['rounds']} | {r['metrics_compared']} | "
                     f"{r['max_abs_difference']:g} | {auc} | {loss} | {r['seconds']['federation']} | "
                     f"{r['seconds']['one_dataset']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run both and write the comparison (see the module docstring); ``--table`` renders
    the recorded comparisons as ``simulations/results/federation_equality.md``."""
    import sys

    if sys.argv[1:] == ["--table"]:
        table = render_table()
        (RESULTS / "federation_equality.md").write_text(table)
        print(table, end="")
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="the whole dataset, FORMAT:PATH")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="partition seed")
    parser.add_argument("--name", default=None, help="results file suffix (default: the spec's format)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    name = args.name or args.spec.split(":", 1)[0]
    sets = ["eval-every=1", f"partition-seed={args.seed}"]
    with tempfile.TemporaryDirectory(prefix="fedrec-eq-") as tmp:
        folder = Path(tmp) / "fed"
        t0 = time.perf_counter()
        write_federation(args.spec, folder, clients=args.clients, seed=args.seed)
        t_partition = time.perf_counter() - t0
        t0 = time.perf_counter()
        fed = run_in_process(_simulate_spec(None, None, sets, folder, rounds=args.rounds), progress=True)
        t_fed = time.perf_counter() - t0
        t0 = time.perf_counter()
        one = run_in_process(_simulate_spec(args.spec, None, sets, shards=args.clients, rounds=args.rounds),
                             progress=True)
        t_one = time.perf_counter() - t0
    a, b = _numbers(fed), _numbers(one)
    if set(a) != set(b):
        raise SystemExit(f"the runs report different metrics: {sorted(set(a) ^ set(b))[:5]}")
    diffs = {k: abs(a[k] - b[k]) for k in a}
    worst = max(diffs, key=diffs.get)
    report = {
        "spec": args.spec, "clients": args.clients, "rounds": args.rounds, "partition_seed": args.seed,
        "commands": [f"fedrec data partition {args.spec} --clients {args.clients} --seed {args.seed} --out DIR",
                     f"fedrec simulate --federation DIR --rounds {args.rounds} --set eval-every=1",
                     f"fedrec simulate --data {args.spec} --clients {args.clients} --rounds {args.rounds} "
                     f"--set eval-every=1 --set partition-seed={args.seed}"],
        "max_abs_difference": diffs[worst], "worst_metric": worst, "metrics_compared": len(diffs),
        "seconds": {"partition": round(t_partition, 2), "federation": round(t_fed, 2), "one_dataset": round(t_one, 2)},
        "federation": {"test": fed["test"], "history": fed["history"], "node_data": fed["node_data"]},
        "one_dataset": {"test": one["test"], "history": one["history"], "node_data": one["node_data"]},
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"federation_equality_{name}.json"
    path.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("spec", "clients", "rounds", "max_abs_difference", "worst_metric",
                                              "metrics_compared", "seconds")}))
    (args.out_dir / "federation_equality.md").write_text(render_table(args.out_dir))
    print(f"test (federation): {fed['test']}\ntest (one dataset): {one['test']}\nwrote {path}")


if __name__ == "__main__":
    main()
