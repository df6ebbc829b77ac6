"""Cross-domain costs, measured side by side in one run: a centralised UniCDR epoch, a federated
round with one client per domain, the private set intersection, and what a domain uploads.

Usage::

    python simulations/bench_cdr.py [--data SPEC] [--data-root ../shared/data] [--json] [--out FILE]
    python simulations/bench_cdr.py --table simulations/results/bench_cdr.json   # its Markdown table

(a) ``epoch_seconds``: one centralised UniCDR epoch (the ``cdr`` defaults: batch 1024, 10
    negatives), after one warm-up epoch;
(b) ``round_seconds``: one federated round (both domains' local epoch, one after the other as
    a single machine runs them, plus the server's aggregation), after a warm-up round;
    ``round_over_epoch`` = (b) / (a);
(c) ``psi_seconds``: the private set intersection of the two domains' users (hashing,
    blinding, raising and intersecting, both parties in this process);
(d) per domain, ``upload_bytes`` = ``rows_bytes`` (the shared rows sent, with their row
    indices and weights) + ``aggregator_bytes`` (the shared aggregator), against
    ``full_table_bytes``: the domain's whole shared user table (a row for each of its users)
    at the same precision, what averaging the full table would send; ``rows_sent`` /
    ``common_users``.

Evaluation is not timed. Default data: DisenCDR's Sport-Cloth under ``--data-root``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedrec.files import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]


def _bytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def measure(data: str) -> dict:
    """Run the four measurements on ``data`` (a ``cdr:`` spec); see the module docstring."""
    import numpy as np
    import torch

    from fedrec.data import load_dataset
    from fedrec.data.batching import build_examples, iterate_batches
    from fedrec.data.catalogue import Catalogue
    from fedrec.data.federation import cut_domains, domain_clients
    from fedrec.data.samplers import UniformNegativeSampler
    from fedrec.data.split import split_dataset
    from fedrec.defaults import defaults
    from fedrec.federated import FederatedConfig, create_algorithm, psi
    from fedrec.models.base import ModelData
    from fedrec.models.registry import create_model
    from fedrec.train import TrainConfig, _optimizers, train_epoch

    central = defaults("cdr:", runtime="centralised", model="unicdr")  # the cdr budget, whatever the format
    batch, negatives, lr = int(central["batch-size"]), int(central["negatives"]), float(central["lr"])
    dataset = load_dataset(data)
    split = split_dataset(dataset)

    # (a) a centralised epoch
    torch.manual_seed(0)
    model = create_model("unicdr", ModelData.from_split(split), {}, task="cdr")
    opts = _optimizers(model, TrainConfig(lr=lr, weight_decay=float(central["weight-decay"])))
    examples = build_examples(split, task="cdr", stage="train", max_len=model.cfg.max_len)
    sampler = UniformNegativeSampler.for_training(split, seed=0)

    def epoch(seed: int) -> float:
        start = time.perf_counter()
        model.train()
        train_epoch(model, opts, iterate_batches(examples, batch_size=batch, shuffle=True, seed=seed,
                                                 num_negatives=negatives, sampler=sampler))
        return time.perf_counter() - start

    epoch(1)
    epoch_seconds = epoch(2)

    # (b), (c), (d) one client per domain
    catalogue = Catalogue.from_split(split)
    cfg = FederatedConfig(lr=lr, negatives=negatives, batch_size=batch, protocol="sampled-999",
                          weight_decay=float(central["weight-decay"]))
    algs = []
    for k, doms in enumerate(domain_clients(split)):
        node_split = split_dataset(cut_domains(dataset, doms, name=f"domain-{k}"), catalogue=catalogue)
        algs.append(create_algorithm("unicdr", node_split, task="cdr", config=cfg))
    start = time.perf_counter()
    rows = psi.run_two_party(algs[0].raw_users(), algs[1].raw_users())
    psi_seconds = time.perf_counter() - start
    for alg, r in zip(algs, rows, strict=True):
        alg.set_alignment(r)
    g = algs[0].initial_global()
    users = [np.arange(1, a.split.n_users + 1) for a in algs]
    states = [a.initial_local(u) for a, u in zip(algs, users, strict=True)]
    shards = [a.make_shard(u) for a, u in zip(algs, users, strict=True)]

    def one_round(rnd: int):
        nonlocal g
        start = time.perf_counter()
        ups = []
        for i, a in enumerate(algs):
            up, states[i], _ = a.client_update(g, states[i], shards[i], round=rnd)
            ups.append(up)
        g, _, _ = algs[0].aggregate(g, ups)
        return time.perf_counter() - start, ups

    one_round(1)
    round_seconds, ups = one_round(2)
    table = g["user_shared.weight"]
    per_domain = {}
    for a, up in zip(algs, ups, strict=True):
        name = a.split.domains[int(a.split.seq_domain[0])]
        rows_part = [up.sums["user_shared.weight"], *up.rows["user_shared.weight"]]
        rest = [v for k, v in up.sums.items() if k != "user_shared.weight"]
        # the domain's whole shared user table (all its users) at the upload's precision: what
        # averaging the full table, as plain FedAvg would, sends
        full = (a.split.n_users + 1) * table.shape[1] * up.sums["user_shared.weight"].element_size()
        per_domain[name] = {"upload_bytes": _bytes(rows_part + rest), "rows_bytes": _bytes(rows_part),
                            "aggregator_bytes": _bytes(rest), "full_table_bytes": int(full),
                            "rows_sent": int(len(up.rows["user_shared.weight"][0])), "users": int(a.split.n_users),
                            "rows_over_full_table": round(_bytes(rows_part) / full, 4)}
    return {"data": data, "epoch_seconds": round(epoch_seconds, 2), "round_seconds": round(round_seconds, 2),
            "round_over_epoch": round(round_seconds / epoch_seconds, 3), "psi_seconds": round(psi_seconds, 2),
            "common_users": int(algs[0].n_shared), "train_examples": int(len(examples)), "batch_size": batch,
            "per_domain": per_domain, "threads": torch.get_num_threads()}


def markdown_table(result: dict) -> str:
    """The README's table of a bench result (rendered from its JSON)."""
    lines = ["| domain | users | common users | rows sent | upload (bytes) | of which rows | whole shared table (bytes) "
             "| rows / whole table |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, d in result["per_domain"].items():
        lines.append(f"| {name} | {d['users']:,} | {result['common_users']:,} | {d['rows_sent']:,} | "
                     f"{d['upload_bytes']:,} | {d['rows_bytes']:,} | {d['full_table_bytes']:,} | "
                     f"{d['rows_over_full_table']:.3f} |")
    lines += ["", f"Centralised epoch {result['epoch_seconds']} s, federated round {result['round_seconds']} s "
                  f"(round / epoch {result['round_over_epoch']}), private set intersection {result['psi_seconds']} s "
                  f"({result['threads']} thread{'s' if result['threads'] != 1 else ''})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"),
                        help="folder holding DisenCDR-sport_cloth (for the default --data)")
    parser.add_argument("--data", default="", help="a cdr: data spec, {data_root} replaced by --data-root (default: "
                        "Sport-Cloth under --data-root)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", default="", help="also write the JSON here (atomically)")
    parser.add_argument("--table", default="", metavar="JSON", help="print the Markdown table of a result file and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())), end="")
        return 0
    data = (args.data or "cdr:{data_root}/DisenCDR-sport_cloth").replace("{data_root}", args.data_root)
    from fedrec.errors import FedrecError

    try:
        result = measure(data)
    except FedrecError as exc:
        print(f"bench_cdr: error: {exc}", file=sys.stderr)
        return 2
    result["data"] = data.replace(args.data_root, "{data_root}")  # no machine paths in results
    text = json.dumps(result, indent=None if args.json else 1)
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
