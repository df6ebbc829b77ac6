"""Run the (row, seed) pairs of ``fedrec compare`` configurations as parallel processes, then
merge them into each configuration's one results file.

``fedrec compare`` runs its rows one after another and rewrites ``<out>/<stem>.json`` after
each, so two processes must never share an output folder. On a machine with many cores (or
a GPU that one small model leaves mostly idle) this script runs each pair as its own
``fedrec compare CONFIG --only ROW --seed K`` process in its own folder
(``<out>/.parallel/<stem>/<row>-seed<k>/``, with its log), ``--workers`` at a time, in the
order given (seed by seed, then config by config, then row by row), and merges every pair
that finished into ``<out>/<stem>.json`` (re-rendering ``.md``, ``.csv`` and the curves, as
``fedrec compare`` would). Pairs already in ``<out>/<stem>.json`` with the configuration's
current fingerprint are skipped, so a rerun resumes. With ``--deadline SECONDS`` the pairs
still running then are stopped and left out (nothing partial is merged), and no new pair
starts once it has passed.

Usage::

    python simulations/parallel_compare.py CONFIG [CONFIG ...] [--seed K ...] [--only ROW ...]
        [--workers N] [--threads T] [--deadline S] [--device DEV] [--data-root DIR] [--out DIR]
        [--set KEY=VALUE ...]

``python simulations/parallel_compare.py --merge-only CONFIG ... --out DIR`` merges what
earlier (e.g. interrupted, or copied from another machine) runs left under
``DIR/.parallel/``. The exit status is 1 when some pair failed or was stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedrec.compare import _fingerprint, _safe, is_done, load_comparison, write_outputs  # noqa: E402
from fedrec.errors import ConfigError, FedrecError  # noqa: E402
from fedrec.files import dumps_entries, write_text_atomic  # noqa: E402

#: the folder, under --out, of each pair's own comparison output and log
WORK = ".parallel"


def pair_dir(out: Path, stem: str, row: str, seed: int) -> Path:
    """Where the pair (``row``, ``seed``) of the comparison ``stem`` runs and logs."""
    return out / WORK / stem / f"{_safe(row)}-seed{seed}"


def plan(configs: list[dict[str, Any]], seeds: list[int], only: list[str] | None, out: Path) -> list[tuple]:
    """The pairs still to run, in order: ``(cfg, row name, seed)`` for every seed, config and
    row (``only``: these row names), skipping those ``out/<stem>.json`` already holds with
    the row's current fingerprint."""
    jobs = []
    names = {r["name"] for cfg in configs for r in cfg["runs"]}
    if only and set(only) - names:
        raise ConfigError(f"--only: no run named {', '.join(sorted(set(only) - names))}")
    for seed in seeds:
        for cfg in configs:
            done = _load(out / f"{cfg['stem']}.json")
            for run in cfg["runs"]:
                if only and run["name"] not in only:
                    continue
                key = f"{run['name']}/seed{seed}"
                if is_done(done, key, _fingerprint(cfg, run)):
                    continue
                jobs.append((cfg, run["name"], seed))
    return jobs


def _load(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not a comparison results file ({exc.msg})") from exc


def merge(cfg: dict[str, Any], out: Path) -> list[str]:
    """Merge every finished pair under ``out/.parallel/<stem>/`` whose fingerprint is the
    row's current one into ``out/<stem>.json`` and re-render its outputs; returns the keys
    merged. A pair that ran under another configuration (another fingerprint) is left out."""
    stem = cfg["stem"]
    target = out / f"{stem}.json"
    results = _load(target)
    current = {r["name"]: _fingerprint(cfg, r) for r in cfg["runs"]}
    merged = []
    for part in sorted((out / WORK / stem).glob(f"*/{stem}.json")):
        for key, value in _load(part).items():
            row = key.rsplit("/seed", 1)[0]
            if current.get(row) != value.get("fingerprint"):
                continue
            if results.get(key) != value:
                results[key] = value
                merged.append(key)
    if merged:
        write_text_atomic(target, dumps_entries(results))
        write_outputs(cfg, results, out)
    return merged


def _command(cfg: dict[str, Any], row: str, seed: int, args: argparse.Namespace, where: Path) -> list[str]:
    cmd = [sys.executable, "-c", "from fedrec.cli import app; app()", "compare", str(cfg["path"]),
           "--only", row, "--seed", str(seed), "--out", str(where)]
    if args.data_root is not None:
        cmd += ["--data-root", args.data_root]
    if args.device:
        cmd += ["--device", args.device]
    for item in args.set:
        cmd += ["--set", item]
    return cmd


def run_all(jobs: list[tuple], args: argparse.Namespace, out: Path) -> dict[str, list[str]]:
    """Run ``jobs``, ``args.workers`` at a time, until done or ``args.deadline``; returns the
    labels of the pairs that finished, failed and were stopped or never started."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    pending = list(jobs)
    running: list[tuple[subprocess.Popen, str, Any, float]] = []
    report: dict[str, list[str]] = {"finished": [], "failed": [], "stopped": [], "not started": []}
    try:
        _loop(pending, running, report, args, out, env, start)
    finally:  # interrupted (Ctrl-C, SIGTERM): no pair process outlives this one
        for proc, _, log, _ in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return report


def _loop(pending: list, running: list, report: dict[str, list[str]], args: argparse.Namespace, out: Path,
          env: dict[str, str], start: float) -> None:
    """The scheduling loop of :func:`run_all` (``running`` is updated in place)."""
    while pending or running:
        late = args.deadline is not None and time.monotonic() - start > args.deadline
        while pending and len(running) < args.workers and not late:
            cfg, row, seed = pending.pop(0)
            where = pair_dir(out, cfg["stem"], row, seed)
            where.mkdir(parents=True, exist_ok=True)
            log = open(where / "log.txt", "w")
            proc = subprocess.Popen(_command(cfg, row, seed, args, where), stdout=log, stderr=subprocess.STDOUT,
                                    env=env, cwd=str(ROOT))
            running.append((proc, f"{cfg['stem']}: {row}/seed{seed}", log, time.monotonic()))
            print(f"[{time.monotonic() - start:6.0f} s] start {running[-1][1]}", flush=True)
        if late:
            for proc, label, log, _ in running:
                proc.kill()
                proc.wait()
                log.close()
                report["stopped"].append(label)
                print(f"[{time.monotonic() - start:6.0f} s] stopped at the deadline: {label}", flush=True)
            running.clear()
            report["not started"] += [f"{c['stem']}: {r}/seed{s}" for c, r, s in pending]
            break
        time.sleep(0.5)
        still = []
        for proc, label, log, t0 in running:
            if proc.poll() is None:
                still.append((proc, label, log, t0))
                continue
            log.close()
            ok = proc.returncode == 0
            report["finished" if ok else "failed"].append(label)
            print(f"[{time.monotonic() - start:6.0f} s] {'done' if ok else f'FAILED (exit {proc.returncode})'} "
                  f"{label} in {time.monotonic() - t0:.0f} s", flush=True)
        running[:] = still


def main(argv: list[str] | None = None) -> int:
    """Run the pairs asked for in parallel and merge them (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", type=Path, help="fedrec compare TOML files")
    parser.add_argument("--seed", type=int, action="append", help="seeds (repeatable; default 0 1 2)")
    parser.add_argument("--only", action="append", help="only these row names (repeatable)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="pairs at a time (default: half the cores)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per pair (default 1)")
    parser.add_argument("--deadline", type=float, help="seconds after which running pairs are stopped, none started")
    parser.add_argument("--device", help="--device of every pair (auto, cpu, cuda, ...)")
    parser.add_argument("--data-root", help="replaces {data_root} in the data specs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as fedrec compare --set")
    parser.add_argument("--out", type=Path, default=Path("results"), help="the comparisons' output folder")
    parser.add_argument("--merge-only", action="store_true", help="merge what earlier runs left; run nothing")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that run_all stops its pair processes
    if args.workers < 1 or args.threads < 1:
        parser.error("--workers and --threads must be >= 1")
    if args.deadline is not None and args.deadline <= 0:
        parser.error("--deadline must be > 0 seconds")
    try:
        configs = []
        for path in args.configs:
            cfg = load_comparison(path, data_root=args.data_root)
            cfg["path"] = path
            configs.append(cfg)
        if len({c["stem"] for c in configs}) != len(configs):
            raise ConfigError("two configurations have the same name (stem): their results would share a file")
        report = {"finished": [], "failed": [], "stopped": [], "not started": []}
        if not args.merge_only:
            if args.set:  # the rows' fingerprints must be those the pairs will record
                from fedrec.compare import apply_overrides
                from fedrec.config import parse_assignments

                configs = [{**apply_overrides(c, parse_assignments(args.set)), "path": c["path"]} for c in configs]
            jobs = plan(configs, args.seed or [0, 1, 2], args.only, args.out)
            print(f"{len(jobs)} (row, seed) pairs to run, {args.workers} at a time", flush=True)
            report = run_all(jobs, args, args.out)
        for cfg in configs:
            keys = merge(cfg, args.out)
            print(f"{cfg['stem']}: merged {len(keys)} pair(s) into {args.out / (cfg['stem'] + '.json')}", flush=True)
    except FedrecError as exc:
        print(f"parallel_compare: error: {exc}", file=sys.stderr)
        return 2
    for what, labels in report.items():
        if labels:
            print(f"{what}: {len(labels)}" + "".join(f"\n  {x}" for x in labels))
    return 1 if report["failed"] or report["stopped"] or report["not started"] else 0


if __name__ == "__main__":
    sys.exit(main())
