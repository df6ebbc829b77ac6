"""Group discovery on synthetic data with known groups: per layer, the NMI of MRFF's routing
against the true groups (and chance), and the share of users in the largest group, for
several gate settings, centralised and federated, over several seeds.

Usage::

    python simulations/group_discovery.py [--modes central federated] [--variants hard default ...]
        [--users 2000] [--groups 4] [--epochs 15] [--rounds 40] [--seeds 0 1 2] [--resume]

Variants (model options over the bare ``mrff`` defaults; ``--list`` prints them): ``hard``
is the reference code's gate, ``default`` whatever ``MRFFConfig`` now defaults to, the
others one mechanism each.

* ``central``: ``fedrec.train.train`` (the bare ``fedrec train`` budget given here), the
  routing of every user's test-time view at the best validation epoch.
* ``federated``: the federated engine in process (:class:`fedrec.federated.algorithm.Algorithm`,
  the code the Flower apps run, tested equal to them), all users every round, 4 clients,
  the MRFF reference protocol (one local Adam step at lr 0.1); routing of each user with
  its own model at the last round, only to groups trained in that round (as evaluation
  routes), and per round the share of users per group and of users whose group changed.

Groups that mean something need two things: a router input that separates the true groups, and
a router that finds the separation. So each centralised report also gives the NMI of the best
k-means (G clusters) of the trained router's own input (``kmeans_gate_input``, per layer),
and ``group_discovery_reference.json`` beside the results gives, per data spec, the NMI of
k-means on simple summaries of each user's training rows (category shares, click rate per
category, clicked items) and of the profile ``segment``: what the data alone lets a clustering find.

Writes ``simulations/results/group_discovery.json`` (one report per mode, variant and seed,
written after each, so ``--resume`` skips what is done; a centralised report without
``kmeans_gate_input`` is run again in its place) and ``group_discovery_<mode>_<variant>.png``
(heatmaps of the first seed's ``default`` and ``hard`` runs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fedrec.data import load_dataset
from fedrec.data.split import TRAIN, split_dataset
from fedrec.federated.config import FederatedConfig
from fedrec.federated.registry import create_algorithm
from fedrec.files import write_json_atomic
from fedrec.inspect import group_report, kmeans_nmi, plot_group_report, route_users, user_gate_inputs
from fedrec.models.base import ModelData
from fedrec.models.registry import create_model
from fedrec.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "simulations" / "results" / "group_discovery.json"
#: beside OUT: what k-means finds in simple summaries of the data alone, per data spec
REFERENCE = "group_discovery_reference.json"

#: name -> model options (over the model's defaults); "central"/"federated" limit a variant
VARIANTS: dict[str, dict] = {
    "hard": {"gate": "hard"},
    "default": {},
    "scaled": {"gate": "scaled", "router_detach": False},
    "entropy": {"gate": "scaled", "entropy": 0.1},
    "soft+entropy": {"gate": "scaled", "balance": "soft", "entropy": 0.1},
    "noise": {"gate": "scaled", "gate_noise": 1.0},
    "z-loss": {"gate": "scaled", "z_loss": 0.01},
    "router-lr": {"gate": "scaled", "router_lr": 0.1},
    "router-lr+entropy": {"gate": "scaled", "router_lr": 0.1, "entropy": 0.1},
    "router-lr-0.01": {"gate": "scaled", "router_lr": 0.01},
    "router-lr-0.01+entropy": {"gate": "scaled", "router_lr": 0.01, "entropy": 0.1},
    "hard+router-lr-0.01": {"gate": "hard", "router_lr": 0.01},
    "no-detach": {"gate": "scaled", "router_detach": False},
    "history-gate": {"gate": "scaled", "gate_input": "history"},
    "history-gate+router-lr": {"gate": "scaled", "gate_input": "history", "router_lr": 0.1},
}
CENTRAL_ONLY = {"soft+entropy"}


def _atomic_json(obj, path: Path) -> None:
    write_json_atomic(obj, path)


def _summary(report: dict) -> dict:
    layers = report["layers"]
    return {"nmi": [e["nmi"] for e in layers], "nmi_chance": [e["nmi_chance"] for e in layers],
            "largest_share": [round(max(e["users_per_group"]) / report["users"], 4) for e in layers],
            "nmi_combined": report["nmi_combined"]}


def run_central(split, spec: str, options: dict, *, seed: int, epochs: int, groups: int) -> dict:
    """Train centrally; the group report of the best-epoch model, with its per-epoch routing."""
    r = train("mrff", split, task="ctr", model_options=options,
              config=TrainConfig(epochs=epochs, patience=epochs, seed=seed, progress=False), data_name=spec)
    model = create_model("mrff", ModelData.from_split(split), options, task="ctr")
    model.load_state_dict(r["model_state"])
    users, routes = route_users(model, split)
    report = group_report(users, routes, groups, split.user_group, seed=seed)
    # the best k-means of the router's own input: whether the input or the router falls short
    gate_users, inputs = user_gate_inputs(model, split)
    report["kmeans_gate_input"] = [kmeans_nmi(x, split.user_group[gate_users], groups, seed=seed) for x in inputs]
    report["history"] = [{"epoch": h["epoch"], **h.get("routing", {})} for h in r["history"]]
    report.update(test=r["test"], best=r["best_epoch"], seconds=r["seconds"])
    return report


def run_federated(split, options: dict, *, seed: int, rounds: int, groups: int, clients: int = 4) -> dict:
    """The federated engine in process; the group report at the last round."""
    start = time.perf_counter()
    alg = create_algorithm("mrff", split, task="ctr", model_options=options,
                           config=FederatedConfig(rounds=rounds, seed=seed, population=split.n_users))
    all_users = np.arange(1, split.n_users + 1)
    shards = [alg.make_shard(part) for part in np.array_split(all_users, clients)]
    states = [alg.initial_local(s.users) for s in shards]
    params, counts = alg.initial_global(), None
    history, best, best_auc = [], None, -1.0
    for rnd in tqdm(range(1, rounds + 1), desc=f"federated {options.get('gate', 'default')}", leave=False):
        uploads = []
        for k, shard in enumerate(shards):
            up, states[k], _ = alg.client_update(params, states[k], shard, round=rnd, group_counts=counts)
            uploads.append(up)
        params, counts, metrics = alg.aggregate(params, uploads)
        total = counts.sum(1, keepdim=True).clamp(min=1)
        entry = {"round": rnd, "share": (counts / total).numpy().round(4).tolist(),
                 "changed": metrics.get("group-changed")}
        if rnd % 5 == 0 or rnd == rounds:
            for stage in ("valid", "test"):
                entry[stage] = alg.combine([alg.client_evaluate(params, st, sh, stage=stage, group_counts=counts)
                                            for st, sh in zip(states, shards)])
            if entry["valid"]["auc"] > best_auc:
                best_auc, best = entry["valid"]["auc"], entry
        history.append(entry)
    users, routes = [], []
    for st, sh in zip(states, shards):
        u, r = alg.route_users(params, st, sh.test, group_counts=counts)
        users.append(u)
        routes.append(r)
    report = group_report(np.concatenate(users), np.concatenate(routes), groups, split.user_group, seed=seed)
    report.update(history=history, test=best["test"], best=best["round"],
                  seconds=round(time.perf_counter() - start, 1))
    return report


def reference_clusterings(split, groups: int, *, seed: int = 0) -> dict:
    """NMI against the true groups of k-means (``groups`` clusters) on simple summaries of each
    user's *training* rows, and of the profile ``segment`` as it is: what the data alone lets a
    clustering find, the bar beside the routers' NMI. Summaries: the share of the user's
    impressions per item category (what the feed showed), the click rate per category (0
    where none was shown), both, and a 16-dimensional SVD of the user x item click counts."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.metrics import normalized_mutual_info_score

    row_user = np.repeat(split.seq_user, np.diff(split.indptr))
    train = split.part == TRAIN
    u, item, label = row_user[train], split.item[train], split.label[train].astype(np.float64)
    cat = split.item_features[:, split.item_feature_names.index("category")][item]
    n_cat = int(split.item_features[:, split.item_feature_names.index("category")].max()) + 1
    shown = np.zeros((split.n_users + 1, n_cat))
    clicks = np.zeros_like(shown)
    np.add.at(shown, (u, cat), 1.0)
    np.add.at(clicks, (u, cat), label)
    users = np.arange(1, split.n_users + 1)
    truth = split.user_group[users]
    share = shown[users] / np.maximum(shown[users].sum(1, keepdims=True), 1.0)
    rate = clicks[users] / np.maximum(shown[users], 1.0)
    bag = np.zeros((split.n_users + 1, split.n_items + 1))
    np.add.at(bag, (u, item), label)
    svd = TruncatedSVD(16, random_state=seed).fit_transform(bag[users])
    out = {"category share of impressions": kmeans_nmi(share, truth, groups, seed=seed),
           "click rate per category": kmeans_nmi(rate, truth, groups, seed=seed),
           "both": kmeans_nmi(np.hstack([share, rate]), truth, groups, seed=seed),
           "clicked items (SVD 16)": kmeans_nmi(svd, truth, groups, seed=seed)}
    if split.user_features is not None and "segment" in split.user_feature_names:
        segment = split.user_features[users, split.user_feature_names.index("segment")]
        out["profile segment"] = round(float(normalized_mutual_info_score(truth, segment)), 4)
    return out


def markdown_table(results: list[dict]) -> str:
    """The README's table, rendered from the reports of the JSON (mean over seeds where a
    (mode, variant) has several): NMI per layer and its chance level (the largest over
    layers), the largest group's share per layer at evaluation, the federated rounds from 5
    on in which some layer had more than 90% of the users in one group, the mean share of
    users changing group per round, and the test AUC."""
    keys = list(dict.fromkeys((r["mode"], r["variant"]) for r in results))
    lines = ["| setting | variant | options | seeds | NMI layer 0 | NMI layer 1 | chance | k-means on the gate input "
             "(layers) | largest group (layers) | rounds >= 5 with a layer > 90% in one group "
             "| users changing group per round | test AUC |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | ---: | --- | ---: |"]
    for mode, variant in keys:
        rows = [r for r in results if r["mode"] == mode and r["variant"] == variant]
        nmi = np.array([r["summary"]["nmi"] for r in rows]).mean(0)
        chance = max(max(r["summary"]["nmi_chance"]) for r in rows)
        largest = np.array([r["summary"]["largest_share"] for r in rows]).mean(0)
        budget = rows[0]["budget"]
        setting = f"centralised, {budget['epochs']} epochs" if mode == "central" else f"federated, {budget['rounds']} rounds"
        collapsed, churn = "–", "–"
        if mode == "federated":
            late = [h for h in rows[0]["history"] if h["round"] >= 5]
            hit = sum(any(max(layer) > 0.9 for layer in h["share"]) for h in late)
            collapsed = f"{hit} of {len(late)}"
            changed = np.array([h["changed"] for r in rows for h in r["history"] if h.get("changed")])
            if changed.size:
                churn = " / ".join(f"{100 * c:.0f}%" for c in changed.mean(0))
        options = ", ".join(f"{k}={v}" for k, v in rows[0]["options"].items() if k not in ("groups", "max-len")) or "defaults"
        auc = np.mean([r["test"]["auc"] for r in rows])
        kmeans = [r["kmeans_gate_input"] for r in rows if "kmeans_gate_input" in r]
        km = " / ".join(f"{x:.3f}" for x in np.mean(kmeans, 0)) if kmeans else "–"
        lines.append(f"| {setting} | {variant} | {options} | {len(rows)} | {nmi[0]:.3f} | {nmi[1]:.3f} | {chance:.3f} | "
                     + km + " | " + " / ".join(f"{x:.2f}" for x in largest) + f" | {collapsed} | {churn} | {auc:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the experiment and write its results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["central", "federated"], choices=["central", "federated"])
    parser.add_argument("--variants", nargs="+", default=["hard", "default"], help="names of VARIANTS (--list)")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=15, help="centralised epochs")
    parser.add_argument("--rounds", type=int, default=40, help="federated rounds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--resume", action="store_true", help="keep the reports already in the JSON, skip their cells")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of the JSON (--out) and exit")
    parser.add_argument("--out", type=Path, default=OUT, help="result JSON (PNGs beside it)")
    args = parser.parse_args(argv)
    if args.list:
        for name, opts in VARIANTS.items():
            print(f"{name:20s} {opts or '(the model defaults)'}{'  [centralised only]' if name in CENTRAL_ONLY else ''}")
        return 0
    if args.table:
        if not args.out.is_file():
            parser.error(f"{args.out}: no results to render")
        print(markdown_table(json.loads(args.out.read_text())), end="")
        return 0
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r} (known: {', '.join(VARIANTS)})")
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if args.resume and out.exists() else []
    # a centralised cell recorded before the k-means of the gate input existed is run again
    done = {(r["mode"], r["variant"], r["seed"], r["data"]) for r in results
            if r["mode"] != "central" or "kmeans_gate_input" in r}
    reference_path = out.parent / REFERENCE
    reference = json.loads(reference_path.read_text()) if reference_path.is_file() else {}
    for seed in args.seeds:
        spec = f"synthetic:users={args.users},groups={args.groups},seed={seed}"
        split = split_dataset(load_dataset(spec))
        if spec not in reference:
            reference[spec] = reference_clusterings(split, args.groups, seed=seed)
            _atomic_json(reference, reference_path)
            print(f"k-means on the data alone, {spec}: {reference[spec]}", flush=True)
        for mode in args.modes:
            for variant in args.variants:
                if (mode, variant, seed, spec) in done or (mode == "federated" and variant in CENTRAL_ONLY):
                    continue
                options = {"groups": args.groups, "max-len": 50, **VARIANTS[variant]}
                if mode == "central":
                    report = run_central(split, spec, options, seed=seed, epochs=args.epochs, groups=args.groups)
                else:
                    report = run_federated(split, options, seed=seed, rounds=args.rounds, groups=args.groups)
                report.update(mode=mode, variant=variant, options=options, data=spec, seed=seed,
                              budget={"epochs": args.epochs} if mode == "central" else {"rounds": args.rounds})
                report["summary"] = _summary(report)
                key = (mode, variant, seed, spec)
                at = [i for i, r in enumerate(results) if (r["mode"], r["variant"], r["seed"], r["data"]) == key]
                if at:  # a re-run cell keeps its place in the table
                    results[at[0]] = report
                else:
                    results.append(report)
                _atomic_json(results, out)
                s = report["summary"]
                print(f"{mode:9s} {variant:18s} seed {seed}: NMI {s['nmi']} (chance {s['nmi_chance']}), largest "
                      f"group {s['largest_share']}, test AUC {report['test']['auc']:.4f}, {report['seconds']}s",
                      flush=True)
                if seed == args.seeds[0] and variant in ("default", "hard"):
                    plot_group_report(report, out.parent / f"{out.stem}_{mode}_{variant}.png")
    for mode in args.modes:
        for variant in args.variants:
            rows = [r for r in results if r["mode"] == mode and r["variant"] == variant]
            if rows:
                nmi = np.array([r["summary"]["nmi"] for r in rows]).mean(0).round(3).tolist()
                share = np.array([r["summary"]["largest_share"] for r in rows]).mean(0).round(3).tolist()
                print(f"{mode:9s} {variant:18s} mean over {len(rows)} seeds: NMI per layer {nmi}, largest group {share}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
