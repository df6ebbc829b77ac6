"""Federated and centralised configurations on the same data and split, side by side.

A comparison is a TOML file::

    title = "KuaiSAR-R: federated vs centralised"
    data = "kuaisar:{data_root}/KuaiSAR-R"    # {data_root} is replaced by --data-root
    task = "ctr"

    [federated]          # run-config keys shared by every federated row
    rounds = 60

    [train]              # TrainConfig keys shared by every centralised row
    epochs = 40

    [[runs]]
    name = "federated MRFF"
    kind = "federated"   # or "centralised" (then ``model = NAME`` is required)
    algorithm = "mrff"   # federated keys of this row (override [federated])
    [runs.options]       # model options (both kinds)
    item-repr = "attributes"
    # [runs.train]       # a centralised row's own TrainConfig keys (override [train])

Every federated row runs through the project's Flower apps in-process
(:func:`fedrec.federated.runner.run_in_process`); every centralised row through
:func:`fedrec.train.train`. Both build the same split from the same data spec. The
per-dataset defaults of :mod:`fedrec.defaults` (as for ``fedrec train`` and ``fedrec
simulate``, ``task`` included) fill in what a row leaves out; the file's keys win, and each
result records what took effect under ``resolved``. Results are
merged into ``<out>/<stem>.json`` (resumable: a finished (row, seed) pair is skipped unless
its configuration changed since), and
``<stem>.md``, ``<stem>.csv`` and ``<stem>_curves.png`` (validation metric per round or
epoch: each row's mean over its seeds, with a min–max band) are rewritten after each run;
:func:`write_outputs` re-renders them from the JSON alone.

A federated AUC is pooled from score histograms (:mod:`fedrec.federated.evaluation`) and
carries the server's ``auc-error-bound``; the table shows it beside the AUC, as
``0.7042 ± 0.0012 (±0.0123 hist.)``, wherever it exceeds :data:`SHOWN_BOUND` (the mean of
the seeds' bounds, itself a bound on the mean's histogram error; column ``test auc bound``
in the CSV). Centralised AUCs are exact.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fedrec.config import build_config, load_toml
from fedrec.errors import ConfigError
from fedrec.files import atomic_path, dumps_entries, write_text_atomic

__all__ = ["load_comparison", "apply_overrides", "row_options", "run_comparison", "comparison_table", "test_metric",
           "write_outputs", "is_done", "plot_curves", "curve_figure", "curve_stats", "auc_cell", "mean_cell", "seeds_cell",
           "SHOWN_BOUND"]

_KINDS = ("federated", "centralised")
#: AUC error bounds above this are shown next to the AUC
SHOWN_BOUND = 1e-3


def load_comparison(path: str | Path, *, data_root: str | None = None) -> dict[str, Any]:
    """Read and check a comparison file (see the module docstring)."""
    cfg = load_toml(path)
    for key in ("data", "runs"):
        if key not in cfg:
            raise ConfigError(f"{path}: missing '{key}'")
    unknown = set(cfg) - {"title", "data", "task", "metrics", "federated", "train", "runs"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    cfg["data_display"] = cfg["data"]  # what tables and results show (no machine paths)
    cfg["data_root"] = None
    if "{data_root}" in cfg["data"]:
        if data_root is None:
            raise ConfigError(f"{path}: data uses {{data_root}}; pass --data-root")
        cfg["data_root"] = str(data_root)
        cfg["data"] = cfg["data"].replace("{data_root}", str(data_root))
    cfg["task_given"] = "task" in cfg
    if not cfg["task_given"]:
        from fedrec.defaults import FORMATS, format_of

        entry = FORMATS.get(format_of(cfg["data"]))
        cfg["task"] = entry.data.get("task", "ctr") if entry is not None else "ctr"
    names = set()
    for i, run in enumerate(cfg["runs"]):
        if "name" not in run or run.get("kind") not in _KINDS:
            raise ConfigError(f"{path}: runs[{i}] needs a 'name' and a 'kind' ({' or '.join(_KINDS)})")
        if run["name"] in names:
            raise ConfigError(f"{path}: run name '{run['name']}' appears twice")
        names.add(run["name"])
        if run["kind"] == "centralised" and "model" not in run:
            raise ConfigError(f"{path}: centralised run '{run['name']}' needs a 'model'")
    cfg["stem"] = Path(path).stem
    return cfg


def _atomic_write(path: Path, text: str) -> None:
    write_text_atomic(path, text)  # the mode open() would give, not mkstemp's 0600


def row_options(cfg: dict[str, Any], run: dict[str, Any]):
    """The options of one row: the per-dataset defaults of the data (:mod:`fedrec.defaults`)
    under the shared table (``[federated]`` or ``[train]``), the row's own keys and its
    ``[runs.options]`` (last wins) -> :class:`~fedrec.defaults.Resolved` (flat keys: ``task``,
    ``model.KEY`` model options and the runtime's keys). A centralised row's ``[runs.train]``
    table overrides ``[train]`` keys for that row. Reads no data."""
    from fedrec.defaults import resolve

    run = dict(run)
    name, kind = run.pop("name"), run.pop("kind")
    model_options = dict(run.pop("options", {}))
    user: dict[str, Any] = {"task": cfg["task"]} if cfg.get("task_given", True) else {}
    if kind == "federated":
        user.update({**cfg.get("federated", {}), **run})
        user.update({f"model.{k}": v for k, v in model_options.items()})
        return resolve(cfg["data"], runtime="federated", user=user)
    model = run.pop("model")
    row_train = dict(run.pop("train", {}))  # [runs.train]: this row's training keys
    if run:
        raise ConfigError(f"centralised run '{name}': unknown key(s) {', '.join(sorted(run))} (put model options in [runs.options])")
    train_table = dict(cfg.get("train", {}))
    for key in [*train_table, *row_train]:
        if str(key).replace("_", "-") == "task" or str(key).startswith("model."):
            raise ConfigError(f"[train] has no option '{key}' (the task is the file's 'task'; model options go in "
                              "[runs.options])")
    user.update(train_table)
    user.update(row_train)
    user.update({f"model.{k}": v for k, v in model_options.items()})
    return resolve(cfg["data"], runtime="centralised", model=model, user=user)


#: keys ``fedrec compare --set`` refuses, and what to use instead (where a row's files go, and
#: what does not change what it computes, are the command's own flags, not row options)
_RUNTIME_FLAGS = {
    "seed": "the seeds are --seed (repeatable)", "device": "use --device (it does not change a row's fingerprint)",
    "log-dir": "use --log-dir (each run logs to LOG_DIR/<row>/seed<k>)", "out": "results go to --out",
    "resume": "finished rows are kept in --out already", "checkpoint": "a comparison keeps no checkpoints",
    "checkpoint-dir": "a comparison keeps no checkpoints", "model-dir": "a comparison keeps no saved models",
    "progress": "not an option",
}


def apply_overrides(cfg: dict[str, Any], sets: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` (a loaded comparison) with the user's ``--set`` items applied to every row,
    over the file's own keys: ``model.KEY`` a model option of every row; a bare (or
    ``train.``) key a training option of the centralised rows and/or a run-config key of the
    federated rows, wherever it is one (``lr``: both; ``epochs``: centralised; ``rounds``:
    federated). Seeds, the device, logs and output places are the command's flags (refused
    here, naming the flag). A key that is neither is an error naming the known ones. The
    rows' fingerprints change with them, so overridden rows are run afresh."""
    import dataclasses

    from fedrec.federated.config import FederatedConfig
    from fedrec.federated.spec import RunSpec
    from fedrec.train import TrainConfig

    train_keys = {f.name.replace("_", "-") for f in dataclasses.fields(TrainConfig)} - {"progress", "resume"}
    run_keys = ({f.name.replace("_", "-") for f in dataclasses.fields(FederatedConfig)}
                | {f.name.replace("_", "-") for f in dataclasses.fields(RunSpec)}) - {"federated", "model-options", "data"}
    cfg = {**cfg, "runs": [dict(r) for r in cfg["runs"]]}
    for raw, value in sets.items():
        key = str(raw)
        if key.startswith("model."):
            for run in cfg["runs"]:
                run["options"] = {**run.get("options", {}), key[len("model."):]: value}
            continue
        key = key[len("train."):] if key.startswith("train.") else key
        kebab = key.replace("_", "-")
        if kebab in _RUNTIME_FLAGS:
            raise ConfigError(f"--set {raw}: {_RUNTIME_FLAGS[kebab]}")
        if kebab not in train_keys and kebab not in run_keys:
            raise ConfigError(f"--set {raw}: unknown option '{key}' (training options: {', '.join(sorted(train_keys))}; "
                              f"run-config keys: {', '.join(sorted(run_keys))}; model options as model.KEY)")
        taken = 0
        for run in cfg["runs"]:
            algorithm = run.get("algorithm", cfg.get("federated", {}).get("algorithm"))
            if kebab == "batch-size" and run["kind"] == "federated" and algorithm != "unicdr":
                continue  # only silo algorithms train in minibatches
            if run["kind"] == "federated" and kebab in run_keys:
                run[kebab] = value
                taken += 1
            elif run["kind"] == "centralised" and kebab in train_keys:
                run["train"] = {**run.get("train", {}), kebab: value}
                taken += 1
        if not taken:  # accepted and then ignored would be worse than refused
            kinds = sorted({r["kind"] for r in cfg["runs"]})
            raise ConfigError(f"--set {raw}: no row of this comparison takes '{key}' (its rows are {' and '.join(kinds)})")
    return cfg


def _run_one(cfg: dict[str, Any], run: dict[str, Any], seed: int, split_cache: dict,
             app_dir: str | Path | None = None, runtime: dict[str, Any] | None = None) -> dict[str, Any]:
    name, kind = run["name"], run["kind"]
    resolved = row_options(cfg, run)
    task = resolved.options.get("task", "ctr")
    runtime = runtime or {}
    log_dir = str(Path(runtime["log_dir"]) / _safe(name) / f"seed{seed}") if runtime.get("log_dir") else ""
    if kind == "federated":
        from fedrec.federated.runner import run_in_process
        from fedrec.federated.spec import parse_run_config

        flat = {**resolved.options, "data": cfg["data"], "seed": seed}
        if runtime.get("device"):
            flat["device"] = runtime["device"]
        if log_dir:
            flat["log-dir"] = log_dir
        result = run_in_process(parse_run_config(flat), app_dir=app_dir)
        metric = result["selection"].split(" ", 1)[1]  # the run's own (its topk may lack 10)
        curve = [(h["round"], h["valid"][metric]) for h in result["history"] if "valid" in h]
        result["curve"] = {"x": "round", "points": curve}
    else:
        from fedrec.data import load_dataset
        from fedrec.data.split import split_dataset
        from fedrec.train import TrainConfig, train

        if "split" not in split_cache:
            split_cache["split"] = split_dataset(load_dataset(cfg["data"]))
        train_opts = {k: v for k, v in resolved.options.items() if k != "task" and not k.startswith("model.")}
        train_opts.update({k: v for k, v in (("device", runtime.get("device")), ("log_dir", log_dir)) if v})
        train_cfg = build_config(TrainConfig, {**train_opts, "seed": seed, "progress": False}, where="train")
        result = train(resolved.model, split_cache["split"], task=task, model_options=resolved.model_options(),
                       config=train_cfg, data_name=cfg["data"])
        result.pop("model_state")
        metric = result["selection"].split(" ", 1)[1]  # the run's own (its topk may lack 10)
        curve = [(h["epoch"], h["valid"][metric]) for h in result["history"]]
        result["curve"] = {"x": "epoch", "points": curve}
    result.update({"row": name, "kind": kind, "seed": seed, "resolved": resolved.record()})
    return result


def _safe(name: str) -> str:
    """A row name as a folder name (letters, digits, ``-_.``; the rest ``_``)."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "row"


def _scrub(obj: Any, cfg: dict[str, Any]) -> Any:
    """Replace the data root by ``{data_root}`` in every string (results carry no machine paths)."""
    root = cfg.get("data_root")
    if not root:
        return obj
    if isinstance(obj, str):
        return obj.replace(root, "{data_root}")
    if isinstance(obj, dict):
        return {k: _scrub(v, cfg) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub(v, cfg) for v in obj]
    return obj


def _fingerprint(cfg: dict[str, Any], run: dict[str, Any]) -> str:
    """What a row's result depends on (a changed config re-runs the row on resume)."""
    import hashlib

    relevant = {"data": cfg["data_display"], "task": cfg["task"], "run": run,
                "shared": cfg.get("federated", {}) if run["kind"] == "federated" else cfg.get("train", {})}
    taken = row_options(cfg, run).defaults
    if taken:  # what the per-dataset defaults set (none for a row that gives every key itself)
        relevant["defaults"] = taken
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _metric(task: str) -> str:
    from fedrec.train import selection_metric

    return selection_metric(task)


def is_done(results: dict[str, Any], key: str, fingerprint: str) -> bool:
    """Whether ``results`` holds the (row, seed) ``key`` run with this very configuration
    (results recorded before fingerprints existed are kept as done)."""
    return key in results and results[key].get("fingerprint", fingerprint) == fingerprint


def run_comparison(cfg: dict[str, Any], *, seeds: list[int], out_dir: str | Path, only: list[str] | None = None,
                   on_result: Callable[[str, dict], None] | None = None,
                   app_dir: str | Path | None = None, runtime: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every (row, seed) not yet in ``out_dir/<stem>.json``; write table, CSV and plot.
    Federated rows run the Flower app in ``app_dir`` (default: as
    :func:`fedrec.federated.runner.find_app_dir` finds it). ``runtime``: ``device`` and
    ``log_dir`` (each run logs to ``LOG_DIR/<row>/seed<k>``), which do not change what a
    row computes and so neither its fingerprint."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{cfg['stem']}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if only:
        missing = set(only) - {r["name"] for r in cfg["runs"]}
        if missing:
            raise ConfigError(f"--only: no run named {', '.join(sorted(missing))}")
    split_cache: dict = {}
    for run in cfg["runs"]:
        if only and run["name"] not in only:
            continue
        fingerprint = _fingerprint(cfg, run)
        for seed in seeds:
            key = f"{run['name']}/seed{seed}"
            if is_done(results, key, fingerprint):
                continue
            results[key] = _scrub(_run_one(cfg, run, seed, split_cache, app_dir, runtime), cfg)
            results[key]["fingerprint"] = fingerprint
            _atomic_write(path, dumps_entries(results))
            write_outputs(cfg, results, out_dir)
            if on_result is not None:
                on_result(key, results[key])
    write_outputs(cfg, results, out_dir)
    return results


def _metrics(cfg: dict[str, Any]) -> list[str]:
    return cfg.get("metrics") or (["auc", "logloss"] if cfg["task"] == "ctr" else ["hr@10", "ndcg@10"])


def mean_cell(values: list[float], digits: int = 4) -> str:
    """A table cell of one metric over seeds: ``mean ± std`` over several seeds, the value
    alone for one seed (a std of one value says nothing), ``-`` without any value."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def seeds_cell(n: int) -> str:
    """The seeds column of a table: the count, or ``1 seed`` for a single one (whose cells
    carry no ``±``)."""
    return "1 seed" if n == 1 else str(n)


def auc_cell(mean: float | None, std: float | None, bound: float | None) -> str:
    """``mean ± std`` of an AUC (the mean alone when ``std`` is None: one seed), with its
    histogram error bound ``(±b hist.)`` when that exceeds :data:`SHOWN_BOUND` (``-``
    without a value)."""
    if mean is None:
        return "-"
    text = f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"
    if bound is not None and bound > SHOWN_BOUND:
        text += f" (±{bound:.4f} hist.)"
    return text


def test_metric(run: dict[str, Any], metric: str) -> float | None:
    """A run's test ``metric``: from ``test``, or, for ``PROTOCOL/NAME`` (e.g. ``full/hr@10``,
    a protocol of ``also-test``), from ``test_by_protocol``; None when the run has neither."""
    value = run["test"].get(metric)
    if value is None and "/" in metric:
        protocol, name = metric.split("/", 1)
        value = run.get("test_by_protocol", {}).get(protocol, {}).get(name)
    return value


def comparison_table(cfg: dict[str, Any], results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per configuration: mean and std over seeds of each test metric (the std None
    when only one seed has a value) and, for ``auc``, ``test auc bound``: the mean of the
    seeds' ``auc-error-bound``, None when the AUCs are exact."""
    rows: dict[str, list[dict]] = {}
    order = [r["name"] for r in cfg["runs"]]
    for run in results.values():
        rows.setdefault(run["row"], []).append(run)
    table = []
    for name in sorted(rows, key=lambda n: order.index(n) if n in order else len(order)):
        runs = rows[name]
        entry = {"row": name, "kind": runs[0]["kind"], "seeds": len(runs)}
        for m in _metrics(cfg):
            vals = [v for v in (test_metric(r, m) for r in runs) if v is not None]
            entry[f"test {m}"] = float(np.mean(vals)) if vals else None
            entry[f"test {m} std"] = float(np.std(vals)) if len(vals) > 1 else None
            if m == "auc":
                bounds = [r["test"]["auc-error-bound"] for r in runs
                          if r["test"].get("auc") is not None and r["test"].get("auc-error-bound") is not None]
                entry["test auc bound"] = float(np.mean(bounds)) if bounds else None
        entry["best"] = ", ".join(str(r.get("best_round", r.get("best_epoch"))) for r in runs)
        entry["seconds"] = float(np.mean([r["seconds"] for r in runs]))
        # wall time per epoch (centralised) or round (federated); None for what does not train
        steps = [r["seconds"] / n for r in runs if (n := r.get("epochs_run", r.get("rounds")) or 0) > 0]
        entry["seconds per step"] = float(np.mean(steps)) if steps else None
        table.append(entry)
    return table


def write_outputs(cfg: dict[str, Any], results: dict[str, Any], out_dir: Path, *, curves: bool = True) -> None:
    """Markdown, CSV and (with ``curves``) learning-curve PNG of the results so far."""
    table = comparison_table(cfg, results)
    metrics = _metrics(cfg)
    lines = [f"### {cfg.get('title', cfg['stem'])}", "",
             f"Data `{cfg['data_display']}`, task {cfg['task']}; test at the best validation round (federated) or epoch "
             "(centralised); mean ± std over seeds (a row of one seed shows its value alone).", "",
             "| configuration | kind | " + " | ".join(f"test {m}" for m in metrics)
             + " | seeds | best round/epoch | seconds | s / epoch or round |",
             "| --- | --- | " + " | ".join("---:" for _ in metrics) + " | ---: | --- | ---: | ---: |"]
    for e in table:
        cells = [auc_cell(e[f"test {m}"], e[f"test {m} std"], e.get("test auc bound")) if m == "auc" else
                 ("-" if e[f"test {m}"] is None else f"{e[f'test {m}']:.4f}" if e[f"test {m} std"] is None
                  else f"{e[f'test {m}']:.4f} ± {e[f'test {m} std']:.4f}") for m in metrics]
        step = "-" if e["seconds per step"] is None else f"{e['seconds per step']:.2f}"
        lines.append(f"| {e['row']} | {e['kind']} | " + " | ".join(cells)
                     + f" | {seeds_cell(e['seeds'])} | {e['best']} | {e['seconds']:.0f} | {step} |")
    if any((e.get("test auc bound") or 0.0) > SHOWN_BOUND for e in table):
        lines += ["", ("(±b hist.): the federated AUC is pooled from score histograms; b bounds its distance from the "
                       "exact AUC (mean of the seeds' `auc-error-bound`), shown where above 0.001. Centralised AUCs "
                       "are exact.")]
    _atomic_write(out_dir / f"{cfg['stem']}.md", "\n".join(lines) + "\n")
    buf = io.StringIO()
    if table:
        writer = csv.DictWriter(buf, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    _atomic_write(out_dir / f"{cfg['stem']}.csv", buf.getvalue())
    if curves:
        plot_curves(cfg, results, out_dir / f"{cfg['stem']}_curves.png")


def curve_stats(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The learning curve of each row over its seeds: ``{row: {"kind", "x", "mean", "min",
    "max", "seeds"}}``, where ``x`` are the rounds (federated) or epochs (centralised) any
    seed evaluated, and ``mean`` / ``min`` / ``max`` the validation metric over the seeds
    that have a value there (seeds stop early at different points; an undefined metric is
    left out). Rows without any point are left out."""
    points: dict[str, dict[int, list[float]]] = {}
    kinds: dict[str, str] = {}
    seeds: dict[str, int] = {}
    for run in results.values():
        curve = [(x, y) for x, y in run.get("curve", {}).get("points", []) if y is not None]
        if not curve:
            continue
        row = run["row"]
        kinds.setdefault(row, run["kind"])
        seeds[row] = seeds.get(row, 0) + 1
        for x, y in curve:
            points.setdefault(row, {}).setdefault(int(x), []).append(float(y))
    out = {}
    for row, by_x in points.items():
        xs = sorted(by_x)
        out[row] = {"kind": kinds[row], "x": xs, "mean": [float(np.mean(by_x[x])) for x in xs],
                    "min": [min(by_x[x]) for x in xs], "max": [max(by_x[x]) for x in xs], "seeds": seeds[row]}
    return out


def curve_figure(cfg: dict[str, Any], results: dict[str, Any]):
    """The matplotlib figure of :func:`plot_curves` (the caller closes it): left the
    federated rows per round, right the centralised rows per epoch; each row's mean over
    its seeds (:func:`curve_stats`) with the seeds' min–max as a band, integer x ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metric = _metric(cfg["task"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    stats = curve_stats(results)
    for row, c in stats.items():
        ax = axes[0] if c["kind"] == "federated" else axes[1]
        label = row if c["seeds"] == 1 else f"{row} (mean of {c['seeds']} seeds)"
        (line,) = ax.plot(c["x"], c["mean"], label=label)
        if c["seeds"] > 1:
            ax.fill_between(c["x"], c["min"], c["max"], color=line.get_color(), alpha=0.2, linewidth=0)
    for ax, title, xlabel in ((axes[0], "federated", "round"), (axes[1], "centralised", "epoch")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"valid {metric}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    several = any(c["seeds"] > 1 for c in stats.values())
    fig.suptitle(cfg.get("title", cfg["stem"]) + (" (bands: min–max over seeds)" if several else ""))
    fig.tight_layout()
    return fig


def plot_curves(cfg: dict[str, Any], results: dict[str, Any], path: Path) -> None:
    """Write :func:`curve_figure` to ``path`` (PNG, atomically): validation metric per round
    (federated) and per epoch (centralised), each row's mean over its seeds with a min–max band."""
    import matplotlib.pyplot as plt

    fig = curve_figure(cfg, results)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
