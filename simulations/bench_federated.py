"""Federated costs on KuaiSAR-R, measured side by side in one run.

Usage::

    python simulations/bench_federated.py [--data-root ../shared/data] [--loop-users 100] [--skip-flwr] [--json]
        [--only-flwr | --only-item-aggregation] [--out FILE]

``--out FILE`` writes the parts measured into that JSON file, keeping the keys of parts not
run this time (``simulations/results/bench_federated.json`` is written this way).

(a) ``round_over_epoch``: wall time of one federated MRFF round over all users (one
    vectorised shard, the reference protocol) divided by one centralised MRFF epoch
    (batch 64) of the same model. Target <= 1.5.
(b) ``vectorised_speedup``: the one-user-at-a-time loop (a model copy and an optimiser per
    user, :mod:`fedrec.federated.reference`) over ``--loop-users`` users, divided by the
    vectorised shard on the same users. Target >= 20.
(c) ``flwr_seconds_per_round`` / ``flwr_startup_seconds``: ``flwr run .`` on Flower's
    simulation engine with 4 SuperNodes (KuaiSAR-R split in 4 shards), 1 and 4 rounds
    (evaluation once, after the last round); per round = (t4 - t1) / 3, start-up = t1 - per
    round.
(e) ``touched_over_all``: federated MRFF next item on LastFM (S3-Rec file; one vectorised
    shard, 4 training negatives, compact item tables), the median of 3 timed rounds
    (``client_update`` + ``aggregate``, after one warm-up round each) with
    ``item-aggregation = touched`` divided by the same with ``all``, the two interleaved round
    by round in one process. Target <= 1.10.
(d) ``peak_mb``: peak resident memory of each part, each measured in its own subprocess
    (for ``flwr run``: the largest sum of RSS over all its processes, sampled every 0.5 s).

Each of (a) and (b) runs in a fresh subprocess so one part's memory does not hide another's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {"item-repr": "attributes"}


def _split(data_root: str):
    from fedrec.data import load_dataset
    from fedrec.data.split import split_dataset

    return split_dataset(load_dataset(f"kuaisar:{data_root}/KuaiSAR-R"))


def part_round(data_root: str) -> dict:
    """One warm-up round, then one timed federated round over all users."""
    import numpy as np

    from fedrec.federated import FederatedConfig, create_algorithm

    split = _split(data_root)
    alg = create_algorithm("mrff", split, task="ctr", model_options=OPTIONS, config=FederatedConfig())
    users = np.arange(1, split.n_users + 1)
    g, st, sh = alg.initial_global(), alg.initial_local(users), alg.make_shard(users)
    up, st, _ = alg.client_update(g, st, sh, round=1)
    g, counts, _ = alg.aggregate(g, [up])
    start = time.perf_counter()
    up, st, _ = alg.client_update(g, st, sh, round=2, group_counts=counts)
    alg.aggregate(g, [up])
    return {"seconds": time.perf_counter() - start, "users": int(split.n_users)}


def part_epoch(data_root: str) -> dict:
    """One warm-up epoch, then one timed centralised MRFF epoch (batch 64)."""
    import torch

    from fedrec.data.batching import build_examples, iterate_batches
    from fedrec.models.base import ModelData
    from fedrec.models.registry import create_model
    from fedrec.train import TrainConfig, _optimizers

    split = _split(data_root)
    torch.manual_seed(0)
    model = create_model("mrff", ModelData.from_split(split), OPTIONS, task="ctr")
    opts = _optimizers(model, TrainConfig())
    examples = build_examples(split, task="ctr", stage="train", max_len=model.cfg.max_len)

    def epoch(seed):
        model.train()
        for batch in iterate_batches(examples, batch_size=64, shuffle=True, seed=seed):
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            model.loss(batch, model(batch)).backward()
            for opt in opts:
                opt.step()

    epoch(1)
    start = time.perf_counter()
    epoch(2)
    return {"seconds": time.perf_counter() - start}


def part_aggregation(data_root: str) -> dict:
    """Rounds of federated MRFF next item on LastFM with ``item-aggregation`` all and touched,
    interleaved (see (e) in the module docstring)."""
    import statistics

    import numpy as np

    from fedrec.data import load_dataset
    from fedrec.data.split import split_dataset
    from fedrec.federated import FederatedConfig, create_algorithm

    split = split_dataset(load_dataset(f"seq:{data_root}/s3rec/LastFM.txt"))
    users = np.arange(1, split.n_users + 1)
    runs = {}
    for agg in ("all", "touched"):
        alg = create_algorithm("mrff", split, task="next_item",
                               model_options={"dim": 64, "heads": 2, "dropout": 0.5, "max-len": 50},
                               config=FederatedConfig(negatives=4, item_aggregation=agg))
        runs[agg] = [alg, alg.initial_global(), alg.initial_local(users), alg.make_shard(users), None]
    times: dict[str, list[float]] = {"all": [], "touched": []}
    for rnd in range(1, 5):
        for agg, run in runs.items():
            alg, g, st, sh, counts = run
            start = time.perf_counter()
            up, st, _ = alg.client_update(g, st, sh, round=rnd, group_counts=counts)
            g, counts, _ = alg.aggregate(g, [up])
            if rnd > 1:  # round 1 warms up
                times[agg].append(time.perf_counter() - start)
            run[1:] = [g, st, sh, counts]
    med = {agg: statistics.median(t) for agg, t in times.items()}
    return {"all_seconds": med["all"], "touched_seconds": med["touched"], "users": int(split.n_users)}


def part_loop(data_root: str, n_users: int) -> dict:
    """The reference loop and the vectorised shard on the same ``n_users`` users."""
    import numpy as np

    from fedrec.federated import FederatedConfig, create_algorithm
    from fedrec.federated.reference import reference_client_update

    split = _split(data_root)
    alg = create_algorithm("mrff", split, task="ctr", model_options=OPTIONS, config=FederatedConfig())
    users = np.arange(1, n_users + 1)
    g, sh = alg.initial_global(), alg.make_shard(users)
    alg.client_update(g, alg.initial_local(users), sh, round=1)  # warm-up
    start = time.perf_counter()
    alg.client_update(g, alg.initial_local(users), sh, round=2)
    vectorised = time.perf_counter() - start
    start = time.perf_counter()
    reference_client_update(alg, g, alg.initial_local(users), sh, round=2)
    loop = time.perf_counter() - start
    return {"vectorised_seconds": vectorised, "loop_seconds": loop, "users": n_users}


def _in_subprocess(name: str, *args) -> dict:
    code = (f"import json, resource, sys; sys.path.insert(0, {str(ROOT / 'simulations')!r}); import bench_federated as b; "
            f"r = b.part_{name}(*{list(args)!r}); r['peak_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; "
            "print('RESULT ' + json.dumps(r))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"bench part {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line), read from /proc (Linux)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(entry.name)] = (ppid, cmd)
    return out


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _tree(roots: list[int], procs: dict[int, tuple[int, str]]) -> set[int]:
    members = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in procs.items():
            if ppid in members and pid not in members:
                members.add(pid)
                grew = True
    return members


def flwr_run(data_root: str, rounds: int, home: Path) -> dict:
    """``flwr run .`` with 4 SuperNodes on KuaiSAR-R; wall seconds and peak summed RSS."""
    home.mkdir(parents=True, exist_ok=True)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port())}
    out = home / f"result{rounds}.json"
    run_config = (f'data="kuaisar:{data_root}/KuaiSAR-R" rounds={rounds} shards=4 eval-every={rounds} '
                  f'model-options="item-repr=attributes" out="{out}"')
    cmd = [str(Path(bin_dir) / "flwr"), "run", str(ROOT), "--federation-config",
           "num-supernodes=4 client-resources-num-cpus=1", "--run-config", run_config, "--stream"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0.0
    marker = f"{home}/local-superlink"
    try:
        while proc.poll() is None:
            procs = _processes()
            roots = [proc.pid] + [pid for pid, (_, c) in procs.items() if marker in c]
            peak = max(peak, sum(_rss_mb(pid) for pid in _tree(roots, procs)))
            time.sleep(0.5)
        seconds = time.perf_counter() - start
    finally:
        for pid, (_, c) in _processes().items():
            if marker in c:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
    if not out.exists():
        raise SystemExit(f"flwr run with {rounds} round(s) did not finish (no result file)")
    return {"seconds": seconds, "peak_mb": peak}


def main(argv: list[str] | None = None) -> int:
    """Run the parts and print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--loop-users", type=int, default=100)
    parser.add_argument("--skip-flwr", action="store_true", help="skip part (c)")
    parser.add_argument("--only-flwr", action="store_true", help="run part (c) only")
    parser.add_argument("--only-item-aggregation", action="store_true", help="run part (e) only")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, help="merge the parts measured into this JSON file")
    args = parser.parse_args(argv)
    if args.only_flwr and args.only_item_aggregation:
        parser.error("--only-flwr and --only-item-aggregation exclude each other")
    data_root = str(Path(args.data_root).resolve())

    result: dict = {"peak_mb": {}}
    if not (args.only_flwr or args.only_item_aggregation):
        result.update(_local_parts(data_root, args.loop_users))
    if not args.only_flwr:
        agg = _in_subprocess("aggregation", data_root)
        print(f"item aggregation {agg}", file=sys.stderr, flush=True)
        result["touched_over_all"] = round(agg["touched_seconds"] / agg["all_seconds"], 3)
        result["item_aggregation_round_seconds"] = {"all": round(agg["all_seconds"], 2),
                                                    "touched": round(agg["touched_seconds"], 2)}
        result["peak_mb"]["item_aggregation_rounds"] = round(agg["peak_mb"])
    if not args.skip_flwr and not args.only_item_aggregation:
        with tempfile.TemporaryDirectory(prefix="fedrec-bench-flwr-") as tmp:
            one = flwr_run(data_root, 1, Path(tmp) / "h1")
            four = flwr_run(data_root, 4, Path(tmp) / "h4")
        per_round = (four["seconds"] - one["seconds"]) / 3
        result["flwr_seconds_per_round"] = round(per_round, 2)
        result["flwr_startup_seconds"] = round(one["seconds"] - per_round, 2)
        result["peak_mb"]["flwr_run_4_supernodes"] = round(max(one["peak_mb"], four["peak_mb"]))
    if args.out is not None:
        from fedrec.files import write_text_atomic

        old = json.loads(args.out.read_text()) if args.out.exists() else {}
        merged = {**old, **{k: v for k, v in result.items() if k != "peak_mb"},
                  "peak_mb": {**old.get("peak_mb", {}), **result["peak_mb"]}}
        write_text_atomic(args.out, json.dumps(merged, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:32s} {value}")
    return 0


def _local_parts(data_root: str, loop_users: int) -> dict:
    rnd = _in_subprocess("round", data_root)
    epo = _in_subprocess("epoch", data_root)
    loop = _in_subprocess("loop", data_root, loop_users)
    print(f"round {rnd}, epoch {epo}, loop {loop}", file=sys.stderr, flush=True)
    return {
        "round_over_epoch": round(rnd["seconds"] / epo["seconds"], 3),
        "vectorised_speedup": round(loop["loop_seconds"] / loop["vectorised_seconds"], 1),
        "round_seconds": round(rnd["seconds"], 2),
        "epoch_seconds": round(epo["seconds"], 2),
        "loop_users": loop["users"],
        "loop_seconds": round(loop["loop_seconds"], 2),
        "vectorised_seconds_same_users": round(loop["vectorised_seconds"], 3),
        "peak_mb": {"federated_round": round(rnd["peak_mb"]), "centralised_epoch": round(epo["peak_mb"]),
                    "loop_and_vectorised": round(loop["peak_mb"])},
    }


if __name__ == "__main__":
    sys.exit(main())
