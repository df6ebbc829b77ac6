"""Scale of the one-client-per-user engine: one federated round and one evaluation at 10k,
100k and 1M users, time and peak memory, measured side by side in one run.

Usage::

    python simulations/bench_scale.py [--users 10000 100000 1000000] [--chunk-size 256] [--shards 1]
        [--chunk-sweep 64 256 1024] [--shard-sweep 1 4 16] [--sweep-users 100000]
        [--memory-cap-gb 8] [--out simulations/results/bench_scale.json]

Every measurement runs in a **fresh subprocess** (so one size's memory cannot hide another's)
and does, on synthetic data (``synthetic:users=N,items=200,min_len=10,max_len=10,...``: the
same items, sequence length and model at every size, recorded in the JSON):

1. ``data``: generate the data and split it (leave-last-two-out): timed and measured on its
   own, since at 1M users it may dominate;
2. ``setup``: build federated MRFF (dim 8, max length 10, 2 groups, per-user FFN and profile,
   CTR) and each shard's examples and initial private state;
3. ``round``: one federated round: every shard's ``client_update`` (all users take part, in
   vectorised chunks of ``--chunk-size``), then the server's aggregation;
4. ``evaluate``: every shard's valid and test summaries and the pooled metrics.

Users are cut into ``--shards`` contiguous shards (clients); the semantics are one client per
user whatever the sharding. Memory is the process's RSS high-water mark
(``resource.getrusage``) after each phase, and the resident size at each phase boundary;
``private_state_bytes_per_user`` is what a shard must keep per user between rounds (its
private tensors), the irreducible per-user state, reported apart from the working memory
(the rise of the high-water mark during the round or the evaluation over the resident size
before it).

Three series, in one run: the users list at ``--chunk-size`` and ``--shards`` (growth in
users), ``--chunk-sweep`` at ``--sweep-users`` (working memory against the chunk size) and
``--shard-sweep`` at ``--sweep-users`` (against the users per shard, at a fixed chunk). A
size whose peak, extrapolated linearly from the largest size measured, would exceed
``--memory-cap-gb`` is not run (other jobs share the machine); a running measurement whose
RSS passes the cap is stopped. Both are recorded as such, with the linear extrapolation
labelled ``extrapolated``. Writes the JSON (``--out``) and a Markdown table beside it
(``.md``). A benchmark, not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "simulations" / "results" / "bench_scale.json"
#: the data and model, fixed across sizes (recorded in the JSON)
DATA = "synthetic:users={users},items=200,min_len=10,max_len=10,groups=2,categories=10,seed=0"
MODEL = {"dim": 8, "max-len": 10, "groups": 2, "heads": 1, "layers": 1, "dropout": 0.0}


# -- one measurement (its own process) -----------------------------------------------------
def _rss_mb() -> float:
    """Resident set size now (MB), from /proc (Linux); the high-water mark elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _peak_mb()


def _peak_mb() -> float:
    """The RSS high-water mark (MB) since the last :func:`_reset_peak` (Linux's ``VmHWM``),
    else since the process started (``resource.getrusage``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _reset_peak() -> bool:
    """Reset the high-water mark to the current RSS (Linux: ``/proc/self/clear_refs``), so
    each phase's peak is its own; False where that is not possible (peaks then accumulate)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _guard(cap_mb: float) -> None:
    """Stop this process (exit 3, one JSON line) when its RSS passes ``cap_mb``."""
    def watch():
        while True:
            rss = _rss_mb()
            if rss > cap_mb:
                print(json.dumps({"stopped": f"RSS {rss:.0f} MB passed the cap of {cap_mb:.0f} MB"}), flush=True)
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def measure(users: int, *, chunk_size: int, shards: int, cap_mb: float) -> dict:
    """One federated round and one evaluation of ``users`` users in ``shards`` shards (see
    the module docstring); phase times (s), RSS high-water marks and resident sizes (MB)."""
    import numpy as np
    import torch

    from fedrec.data import load_dataset
    from fedrec.data.split import split_dataset
    from fedrec.federated import FederatedConfig, create_algorithm

    _guard(cap_mb)
    torch.set_num_threads(1)
    out: dict = {"users": users, "chunk_size": chunk_size, "shards": shards}
    base = _rss_mb()
    out["phase_peaks"] = _reset_peak()  # True: each phase's peak is its own (else cumulative)
    t0 = time.perf_counter()
    split = split_dataset(load_dataset(DATA.format(users=users)))
    out["data_s"] = time.perf_counter() - t0
    out["data_peak_mb"], out["data_rss_mb"] = _peak_mb(), _rss_mb()
    out["import_rss_mb"] = base
    out["interactions"] = int(len(split.item))

    _reset_peak()
    t0 = time.perf_counter()
    alg = create_algorithm("mrff", split, task="ctr", model_options=MODEL,
                           config=FederatedConfig(chunk_size=chunk_size, rounds=1))
    bounds = np.linspace(1, users + 1, shards + 1).round().astype(np.int64)
    parts = [np.arange(bounds[i], bounds[i + 1]) for i in range(shards)]
    shard_list = [alg.make_shard(p) for p in parts]
    states = [alg.initial_local(p) for p in parts]
    g = alg.initial_global()
    out["setup_s"] = time.perf_counter() - t0
    out["setup_peak_mb"], out["setup_rss_mb"] = _peak_mb(), _rss_mb()
    state_bytes = sum(t.numel() * t.element_size() for s in states for t in s.tensors.values())
    out["private_state_bytes_per_user"] = state_bytes / users
    out["global_params"] = int(sum(v.numel() for v in g.values()))

    _reset_peak()
    t0 = time.perf_counter()
    uploads = []
    for i, (sh, st) in enumerate(zip(shard_list, states, strict=True)):
        up, states[i], _ = alg.client_update(g, st, sh, round=1)
        uploads.append(up)
    g, counts, metrics = alg.aggregate(g, uploads)
    del uploads
    out["round_s"] = time.perf_counter() - t0
    out["round_peak_mb"], out["round_rss_mb"] = _peak_mb(), _rss_mb()
    out["users_trained"] = int(metrics["users"])

    _reset_peak()
    t0 = time.perf_counter()
    pooled = {}
    for stage in ("valid", "test"):
        summaries = [alg.client_evaluate(g, st, sh, stage=stage, group_counts=counts)
                     for sh, st in zip(shard_list, states, strict=True)]
        pooled[stage] = alg.combine(summaries)
    out["evaluate_s"] = time.perf_counter() - t0
    out["evaluate_peak_mb"], out["evaluate_rss_mb"] = _peak_mb(), _rss_mb()
    out["test_auc"] = pooled["test"].get("auc")
    # working memory: how far a phase raised the high-water mark over what was resident before it
    out["round_working_mb"] = max(0.0, out["round_peak_mb"] - out["setup_rss_mb"])
    out["evaluate_working_mb"] = max(0.0, out["evaluate_peak_mb"] - out["round_rss_mb"])
    out["peak_mb"] = max(out[f"{p}_peak_mb"] for p in ("data", "setup", "round", "evaluate"))
    return out


def _worker(args: argparse.Namespace) -> int:
    res = measure(args.worker, chunk_size=args.chunk_size, shards=args.shards, cap_mb=args.memory_cap_gb * 1024)
    print(json.dumps(res), flush=True)
    return 0


# -- the driver -----------------------------------------------------------------------------
def run_one(users: int, chunk_size: int, shards: int, cap_gb: float, timeout: float) -> dict:
    """One measurement in a fresh subprocess; its JSON, or what stopped it."""
    cmd = [sys.executable, __file__, "--worker", str(users), "--chunk-size", str(chunk_size), "--shards",
           str(shards), "--memory-cap-gb", str(cap_gb)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"users": users, "chunk_size": chunk_size, "shards": shards,
                "stopped": f"ran past the {timeout:.0f} s timeout"}
    last = (done.stdout.strip().splitlines() or ["{}"])[-1]
    try:
        res = json.loads(last)
    except json.JSONDecodeError:
        res = {}
    if done.returncode != 0 and "stopped" not in res:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        res = {"stopped": f"exit {done.returncode}: {tail}"}
    res.update({"users": users, "chunk_size": chunk_size, "shards": shards,
                "wall_s": round(time.perf_counter() - t0, 2)})
    return res


def _projected_mb(done: list[dict], users: int) -> float | None:
    """Peak memory of ``users`` extrapolated linearly (per user, plus the constant) from
    the measured sizes of a series."""
    ok = sorted((r for r in done if "peak_mb" in r), key=lambda r: r["users"])
    if not ok:
        return None
    if len(ok) == 1:
        return ok[0]["peak_mb"] * users / ok[0]["users"]
    a, b = ok[-2], ok[-1]
    slope = (b["peak_mb"] - a["peak_mb"]) / (b["users"] - a["users"])
    return b["peak_mb"] + slope * (users - b["users"])


def _extrapolate(done: list[dict], users: int) -> dict:
    """Time and memory of ``users`` by linear extrapolation from the two largest sizes
    measured (labelled as such)."""
    ok = sorted((r for r in done if "peak_mb" in r), key=lambda r: r["users"])[-2:]
    if len(ok) < 2:
        return {}
    a, b = ok
    out = {}
    for key in ("data_s", "setup_s", "round_s", "evaluate_s", "peak_mb"):
        slope = (b[key] - a[key]) / (b["users"] - a["users"])
        out[key] = round(b[key] + slope * (users - b["users"]), 1)
    out["from_users"] = [a["users"], b["users"]]
    return out


def series(sizes: list[tuple[int, int, int]], cap_gb: float, timeout: float, label: str) -> list[dict]:
    """Run ``(users, chunk_size, shards)`` in order; skip what would pass the cap."""
    done: list[dict] = []
    for users, chunk, shards in sizes:
        same = [r for r in done if r["chunk_size"] == chunk and r["shards"] == shards]
        proj = _projected_mb(same, users)
        if proj is not None and proj > cap_gb * 1024:
            res = {"users": users, "chunk_size": chunk, "shards": shards,
                   "stopped": f"not run: projected peak {proj / 1024:.1f} GiB > cap {cap_gb:g} GiB",
                   "extrapolated": _extrapolate(same, users)}
            print(f"[{label}] {users:,} users, chunk {chunk}, {shards} shard(s): {res['stopped']}", flush=True)
            done.append(res)
            continue
        print(f"[{label}] {users:,} users, chunk {chunk}, {shards} shard(s) ...", flush=True)
        res = run_one(users, chunk, shards, cap_gb, timeout)
        if "stopped" in res:
            res["extrapolated"] = _extrapolate(same, users)
            print(f"[{label}]   stopped: {res['stopped']}", flush=True)
        else:
            print(f"[{label}]   data {res['data_s']:.1f} s, round {res['round_s']:.1f} s, evaluate "
                  f"{res['evaluate_s']:.1f} s, peak {res['peak_mb']:.0f} MB (round working "
                  f"{res['round_working_mb']:.0f} MB)", flush=True)
        done.append(res)
    return done


def ratios(rows: list[dict]) -> list[dict]:
    """Per-user time and memory growth of a series against its first size."""
    ok = [r for r in rows if "peak_mb" in r]
    if not ok:
        return []
    first = ok[0]
    out = []
    for r in ok:
        n = r["users"] / first["users"]
        out.append({"users": r["users"], "users_x": n,
                    "round_us_per_user": 1e6 * r["round_s"] / r["users"],
                    "evaluate_us_per_user": 1e6 * r["evaluate_s"] / r["users"],
                    "data_us_per_user": 1e6 * r["data_s"] / r["users"],
                    "round_time_x": r["round_s"] / first["round_s"],
                    "peak_growth_mb_per_1k_users": (1000 * (r["peak_mb"] - first["peak_mb"]) / (r["users"] - first["users"])
                                                    if r is not first else None),
                    "round_working_mb": r["round_working_mb"], "evaluate_working_mb": r["evaluate_working_mb"],
                    "private_state_bytes_per_user": r["private_state_bytes_per_user"]})
    return out


def _cell(r: dict, key: str, fmt: str) -> str:
    if key in r:
        return format(r[key], fmt)
    ex = r.get("extrapolated", {})
    return f"~{format(ex[key], fmt)} (extrapolated)" if key in ex else "—"


def markdown(doc: dict) -> str:
    """The Markdown tables of a ``bench_scale.json``."""
    lines = [f"Data `{doc['data']}`; model MRFF {json.dumps(doc['model'])}, CTR; one round (all users) and one "
             f"evaluation (valid + test); {doc['threads']} thread; machine: {doc['machine']}.", ""]

    def table(rows: list[dict], title: str) -> None:
        lines.extend([f"**{title}**", "",
                      "| users | chunk | shards | data s | round s | evaluate s | round µs/user | peak MB | "
                      "round working MB | evaluate working MB | private state B/user | note |",
                      "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"])
        for r in rows:
            per_user = f"{1e6 * r['round_s'] / r['users']:.0f}" if "round_s" in r else "—"
            lines.append(f"| {r['users']:,} | {r['chunk_size']} | {r['shards']} | {_cell(r, 'data_s', '.1f')} | "
                         f"{_cell(r, 'round_s', '.1f')} | {_cell(r, 'evaluate_s', '.1f')} | {per_user} | "
                         f"{_cell(r, 'peak_mb', '.0f')} | {_cell(r, 'round_working_mb', '.0f')} | "
                         f"{_cell(r, 'evaluate_working_mb', '.0f')} | {_cell(r, 'private_state_bytes_per_user', '.0f')} | "
                         f"{r.get('stopped', '')} |")
        lines.append("")

    table(doc["users"], "Growth in users")
    if doc.get("chunk_sweep"):
        table(doc["chunk_sweep"], f"Chunk size at {doc['sweep_users']:,} users")
    if doc.get("shard_sweep"):
        table(doc["shard_sweep"], f"Users per shard at {doc['sweep_users']:,} users, chunk {doc['chunk_size']}")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the series and write the JSON and the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="numbers of users, in increasing order (default 10000 100000 1000000)")
    parser.add_argument("--chunk-size", type=int, default=256, help="users per vectorised pass (default 256)")
    parser.add_argument("--shards", type=int, default=1, help="clients the users are cut into (default 1)")
    parser.add_argument("--chunk-sweep", type=int, nargs="*", default=[64, 256, 1024],
                        help="chunk sizes tried at --sweep-users (default 64 256 1024; none: skip)")
    parser.add_argument("--shard-sweep", type=int, nargs="*", default=[1, 4, 16],
                        help="shard counts tried at --sweep-users and --chunk-size (default 1 4 16; none: skip)")
    parser.add_argument("--sweep-users", type=int, default=100_000, help="users of the two sweeps (default 100000)")
    parser.add_argument("--memory-cap-gb", type=float, default=8.0,
                        help="do not run (or stop) a measurement whose RSS would pass this (default 8)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement (default 3600)")
    parser.add_argument("--out", type=Path, default=OUT, help="the JSON (default simulations/results/bench_scale.json; "
                                                               "the Markdown table goes beside it as .md)")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)
    for name in ("chunk_size", "shards", "sweep_users"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(n < 1 for n in args.users + args.chunk_sweep + args.shard_sweep):
        parser.error("--users, --chunk-sweep and --shard-sweep take positive integers")
    if args.users != sorted(args.users):
        parser.error("--users must be in increasing order (larger sizes are projected from smaller ones)")
    cap, tmo = args.memory_cap_gb, args.timeout
    t0 = time.perf_counter()
    doc = {"data": DATA.format(users="N"), "model": MODEL, "task": "ctr", "threads": 1,
           "machine": f"{os.cpu_count()} CPUs", "memory_cap_gb": cap, "chunk_size": args.chunk_size,
           "shards": args.shards, "sweep_users": args.sweep_users,
           "users": series([(n, args.chunk_size, args.shards) for n in args.users], cap, tmo, "users")}
    doc["chunk_sweep"] = series([(args.sweep_users, c, args.shards) for c in args.chunk_sweep], cap, tmo, "chunk")
    doc["shard_sweep"] = series([(args.sweep_users, args.chunk_size, s) for s in args.shard_sweep], cap, tmo, "shards")
    doc["ratios"] = ratios(doc["users"])
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    for r in doc["ratios"]:
        growth = r["peak_growth_mb_per_1k_users"]
        print(f"{r['users']:>10,} users (x{r['users_x']:g}): round {r['round_us_per_user']:.0f} µs/user "
              f"(time x{r['round_time_x']:.1f}), evaluate {r['evaluate_us_per_user']:.0f} µs/user, data "
              f"{r['data_us_per_user']:.0f} µs/user, peak +{'' if growth is None else f'{growth:.2f}'} MB per 1k users, "
              f"round working {r['round_working_mb']:.0f} MB, private state {r['private_state_bytes_per_user']:.0f} B/user")
    from fedrec.files import write_json_atomic, write_text_atomic

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(doc, args.out)
    write_text_atomic(args.out.with_suffix(".md"), markdown(doc))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
