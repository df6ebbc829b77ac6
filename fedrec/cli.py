"""The ``fedrec`` command line.

Every command has ``--help``. Errors in the user's input (a bad spec, a bad file) are
printed as one line on stderr with a non-zero exit (2), never as a traceback.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from fedrec import __version__
from fedrec.errors import ConfigError, FedrecError

app = typer.Typer(
    help="fedrec: federated, privacy-preserving multifaceted user modelling for recommendation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect data sources.", no_args_is_help=True)
app.add_typer(data_app, name="data")

EXIT_USER_ERROR = 2
#: the data of a bare `fedrec simulate` (the quickstart's synthetic population)
DEFAULT_SIMULATION_DATA = "synthetic:users=600"


def _check_outputs(*named, folder: bool = False) -> None:
    """Refuse, before any work, outputs that cannot be written (``(option, path)`` pairs;
    a None path is skipped): see :func:`fedrec.files.check_writable`."""
    from fedrec.files import check_writable

    for what, path in named:
        if path is not None:
            check_writable(path, what, folder=folder)


def _checked_device(device: str) -> str:
    """``device`` if this machine has it (a one-line error otherwise, before any work)."""
    from fedrec.device import resolve_device

    resolve_device(device)
    return device


def _fail(exc: Exception) -> None:
    typer.echo(f"fedrec: error: {exc}", err=True)
    raise typer.Exit(EXIT_USER_ERROR)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedrec {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """fedrec: federated, privacy-preserving multifaceted user modelling for recommendation."""
    from fedrec.logs import configure_cli_logging, configure_cli_warnings

    configure_cli_logging()  # one line per epoch / round on stderr when it is not a terminal
    configure_cli_warnings()  # fedrec's warnings (e.g. a DP delta above 1 / population) as one line


@data_app.command("describe")
def data_describe(
    spec: str = typer.Argument(
        ...,
        metavar="SPEC",
        help="Data source FORMAT:PATH[?key=value&...], e.g. kuaisar:DIR, movielens:u.data, "
        "seq:Beauty.txt, pairs:Video.txt, cdr:DIR, csv:FILE?user=..&item=.., synthetic:users=2000; "
        "or a federation folder (each client's file).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Print users, items, interactions, density, label rate, sequence lengths and domains
    (for a federation folder of `fedrec data partition`: of each client's file)."""
    from fedrec.data import load_dataset
    from fedrec.data.describe import describe
    from fedrec.data.federation import client_entry, is_federation, load_manifest

    try:
        if ":" not in spec and is_federation(spec):
            manifest = load_manifest(spec)
            clients = [describe(load_dataset(client_entry(spec, int(c["client"]))[0])) for c in manifest["clients"]]
            if as_json:
                typer.echo(json.dumps({"federation": spec, "population": manifest["population"],
                                       "items": manifest["items"], "clients": clients}))
                return
            for stats in clients:
                _print_stats(stats)
            return
        stats = describe(load_dataset(spec))
    except FedrecError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(stats))
        return
    _print_stats(stats)


@data_app.command("partition")
def data_partition(
    spec: str = typer.Argument(..., metavar="SPEC", help="The whole dataset, FORMAT:PATH[?key=value&...]."),
    clients: int = typer.Option(..., "--clients", "-n", help="Number of clients (shards of users)."),
    partition: str = typer.Option("iid", "--partition", help="iid, dirichlet (non-IID by true group or dominant category), or domain (cross-domain data: one client per domain, each file holding that domain's rows)."),
    alpha: float = typer.Option(0.5, "--alpha", help="Dirichlet concentration (dirichlet only; small = more skewed)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the partition."),
    out: Path = typer.Option(..., "--out", help="The federation folder to write (must not exist, or be empty)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as one JSON object."),
) -> None:
    """Write a federation folder: the shared item catalogue, one file per client holding only
    its users' interactions (raw ids, `parquet:`), and a manifest. Run it with `fedrec
    simulate --federation DIR`, or give each SuperNode its own file."""
    from fedrec.data.federation import write_federation

    try:
        if partition not in ("iid", "dirichlet", "domain"):
            raise FedrecError(f"--partition must be iid, dirichlet or domain (got {partition!r})")
        if partition != "dirichlet" and alpha != 0.5:
            raise FedrecError("--alpha applies only to --partition dirichlet")
        if clients < 1:
            raise FedrecError(f"--clients must be >= 1 (got {clients})")
        if seed < 0:
            raise FedrecError(f"--seed must be >= 0 (got {seed})")
        _check_outputs(("--out", out), folder=True)
        manifest = write_federation(spec, out, clients=clients, partition=partition, alpha=alpha, seed=seed,
                                    progress=not as_json and sys.stderr.isatty())
    except FedrecError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(manifest))
        return
    typer.echo(f"{out}: {len(manifest['clients'])} clients, {manifest['population']:,} users, "
               f"{manifest['items']:,} items in the catalogue (partition {partition}, seed {seed})")
    for c in manifest["clients"]:
        typer.echo(f"  client {c['client']}: {c['users']:,} users, {c['rows']:,} rows  ({c['data']})")
    typer.echo(f"run it: fedrec simulate --federation {out}")


TOPK_HELP = ("Ranking tasks: the K list of hr@K, ndcg@K, recall@K, precision@K, map@K and coverage@K (full "
             "ranking), comma-separated, e.g. 5,10,20,50 (default 5,10,20).")


def _check_topk_task(task: str, user: dict) -> None:
    """Refuse a K list on a CTR run (its metrics have no K; the list would be ignored)."""
    if task == "ctr" and "topk" in user:
        raise FedrecError("topk applies to the ranking tasks (next_item, cdr); a ctr run reports AUC, GAUC and "
                          "LogLoss (drop --topk / the topk key)")


DEFAULTS_HELP = ("Per-dataset defaults apply (the best recorded setting of the data's format; `fedrec defaults "
                 "SPEC` prints them); your flags, --set and --config keys win, and the result JSON records both "
                 "under 'resolved'.")


def _train_resolve(model: str, data: str, config: Optional[Path], sets: Optional[list[str]], **flags):
    """The options of ``fedrec train``: the per-dataset defaults (:mod:`fedrec.defaults`)
    under the ``[model]`` / ``[train]`` tables of ``config``, ``--set`` and the explicit
    ``flags`` (``task``, ``protocol``, ``epochs``, ``seed``, ``checkpoint``,
    ``negatives_file``; None = not given), in that order of precedence (last wins).

    Returns ``(resolved, split_table)``: the :class:`~fedrec.defaults.Resolved` flat keys
    (``task``, ``model.KEY`` model options, the rest :class:`~fedrec.train.TrainConfig`
    keys) and the ``[split]`` table of ``config``. Reads no data."""
    from fedrec.config import load_toml, parse_assignments
    from fedrec.defaults import resolve

    file_cfg = load_toml(config) if config else {}
    unknown = set(file_cfg) - {"model", "train", "split"}
    if unknown:
        raise FedrecError(f"{config}: unknown table(s) {', '.join(sorted(unknown))} (known: model, train, split)")
    train_table = dict(file_cfg.get("train", {}))
    for key in train_table:
        if str(key).replace("_", "-") == "task" or str(key).startswith("model."):
            raise ConfigError(f"{config}: [train] has no option '{key}' (the task is --task; model options go in [model])")
    user: dict = dict(train_table)
    user.update({f"model.{k}": v for k, v in file_cfg.get("model", {}).items()})
    split_table = dict(file_cfg.get("split", {}))
    for key, value in _train_assignments(model, sets).items():
        if key.startswith("split."):
            split_table[key[len("split."):]] = value
        else:
            user[key] = value
    user.update({k.replace("_", "-"): v for k, v in flags.items() if v is not None})
    return resolve(data, runtime="centralised", model=model, user=user), split_table


def _option_names(cls) -> set[str]:
    """The kebab-case option names of config dataclass ``cls``."""
    import dataclasses

    return {f.name.replace("_", "-") for f in dataclasses.fields(cls) if f.init}


def _model_option_names(model: str) -> set[str]:
    """The kebab-case option names of registered model ``model`` (empty for one without
    options, or a name that is not registered: the model's own check reports it)."""
    from fedrec.models.registry import MODELS

    try:
        spec = MODELS.create(model)
    except FedrecError:
        return set()
    return _option_names(spec.config) if spec.config is not None else set()


def _train_assignments(model: str, sets: Optional[list[str]]) -> dict:
    """``fedrec train --set`` items as resolved keys: ``model.KEY`` (a model option),
    ``train.KEY`` or a bare training option (:class:`~fedrec.train.TrainConfig`),
    ``split.KEY`` (the ``[split]`` table), ``task``; any other bare key is a model option
    (so ``--set dim=64`` keeps working). A bare key that is both a training and a model
    option is an error asking for the prefix."""
    from fedrec.config import parse_assignments
    from fedrec.train import TrainConfig

    train_keys = _option_names(TrainConfig) - {"progress", "resume"}
    model_keys = _model_option_names(model)
    out: dict = {}
    for key, value in parse_assignments(sets).items():
        name = str(key)
        if name.startswith(("model.", "split.")):
            out[name] = value
            continue
        if name.startswith("train."):
            name = name[len("train."):]
            if name.replace("_", "-") not in train_keys:
                raise ConfigError(f"--set {key}: unknown training option '{name}' "
                                  f"(known: {', '.join(sorted(train_keys))})")
            out[name.replace("_", "-")] = value
            continue
        kebab = name.replace("_", "-")
        if kebab == "task":
            out["task"] = value
        elif kebab in train_keys and kebab in model_keys:
            raise ConfigError(f"--set {key}: '{name}' is both a training option and an option of model '{model}'; "
                              f"write train.{name} or model.{name}")
        elif kebab in train_keys:
            out[kebab] = value
        elif model_keys and kebab not in model_keys:
            raise ConfigError(f"--set {key}: '{name}' is neither a training option ({', '.join(sorted(train_keys))}) "
                              f"nor an option of model '{model}' ({', '.join(sorted(model_keys))})")
        else:
            out[f"model.{name}"] = value
    return out


@app.command("train", epilog=DEFAULTS_HELP)
def train_command(
    model: str = typer.Option(..., "--model", "-m", help="Model name (see `fedrec models`)."),
    data: str = typer.Option(..., "--data", "-d", help="Data spec FORMAT:PATH[?key=value&...]."),
    task: Optional[str] = typer.Option(None, "--task", help="ctr, next_item or cdr (cross-domain; default: from the data format; ctr for one without defaults)."),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="next_item / cdr: full, sampled-99 or sampled-999 (default: from the data format, else full)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Maximum epochs (early stopping on validation; default: from the data format, else 30)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (training order, init, negatives)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (the training option lr)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Training batch size (the training option batch-size)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (a GPU when present; the default), cpu, cuda, cuda:N or mps."),
    log_dir: Optional[Path] = typer.Option(None, "--log-dir", help="Experiment log: metrics.jsonl (one line per epoch) and TensorBoard events (when installed) in this folder."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file with [model], [train] and [split] tables."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="An option KEY=VALUE (repeatable): a training option (lr=0.01, or train.lr=0.01), a model option (model.dim=64; a bare key that is no training option is a model option), or split.KEY."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the result JSON here (atomically)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Save the best weights here."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Training-state file: written after every epoch, and resumed from when it exists (same model, data, options and config), so an interrupted run ends as an uninterrupted one."),
    negatives_file: Optional[Path] = typer.Option(None, "--negatives-file", help="Fixed sampled-ranking negatives per user ('user neg_1 ... neg_N', raw ids, e.g. S3-Rec's LastFM_sample.txt) for the sampled protocol, instead of uniform draws."),
    topk: Optional[str] = typer.Option(None, "--topk", help=TOPK_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (no table)."),
) -> None:
    """Train a model centrally and report validation and test metrics at the best validation epoch."""
    from fedrec.config import build_config
    from fedrec.data import load_dataset
    from fedrec.data.split import SplitConfig, split_dataset
    from fedrec.train import TrainConfig, train

    try:
        if log_dir is not None:
            from fedrec.logs import check_log_dir

            check_log_dir(log_dir)  # before any data is read
        _check_outputs(("--out", out), ("--checkpoint", checkpoint), ("--resume", resume))
        resolved, split_table = _train_resolve(
            model, data, config, sets, task=task, protocol=protocol, epochs=epochs, seed=seed, lr=lr,
            batch_size=batch_size, device=device,
            checkpoint=None if checkpoint is None else str(checkpoint),
            negatives_file=None if negatives_file is None else str(negatives_file), topk=topk)
        task = resolved.options.get("task", "ctr")
        if task not in ("ctr", "next_item", "cdr"):
            raise FedrecError(f"--task must be ctr, next_item or cdr (got {task!r})")
        _check_topk_task(task, resolved.user)
        train_options = {k: v for k, v in resolved.options.items() if k != "task" and not k.startswith("model.")}
        if resume is not None:
            train_options["resume"] = str(resume)
        if log_dir is not None:  # where the log goes is not an option of the run (not recorded)
            train_options["log_dir"] = str(log_dir)
        train_options.setdefault("progress", not as_json and sys.stderr.isatty())
        train_cfg = build_config(TrainConfig, train_options, where="train")
        split_cfg = build_config(SplitConfig, split_table, where="split")
        split = split_dataset(load_dataset(data), split_cfg)
        result = train(model, split, task=task, model_options=resolved.model_options(), config=train_cfg,
                       data_name=data)
    except FedrecError as exc:
        _fail(exc)
    result.pop("model_state", None)
    result["resolved"] = resolved.record()
    if out is not None:
        _write_json_atomic(result, out)
    if as_json:
        typer.echo(json.dumps(result))
        return
    _print_result(result)


@app.command("evaluate")
def evaluate_command(
    saved: Path = typer.Argument(..., metavar="FILE|DIR", help="A --checkpoint file or a --resume training state of `fedrec train`, or the model-dir of a federated run."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Data spec FORMAT:PATH[?key=value&...] of the run (the same split; centralised models)."),
    clients: Optional[list[Path]] = typer.Option(None, "--client", help="Federated model: a client's model file client-K.pt (repeatable; default: every client-*.pt in DIR)."),
    node_config: Optional[list[str]] = typer.Option(None, "--node-config", help="Federated model: KEY=VALUE replacing a key of the clients' saved node config, e.g. data=... when the file moved (repeatable)."),
    protocols: Optional[list[str]] = typer.Option(None, "--protocol", help="next_item: full, sampled-99 or sampled-999 (repeatable; default: the run's own)."),
    negatives_file: Optional[str] = typer.Option(None, "--negatives-file", help="Fixed sampled-ranking negatives per user ('user neg_1 ... neg_N', raw ids) instead of uniform draws; '' for uniform draws (default: as the run did)."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file whose [split] table the run used."),
    topk: Optional[str] = typer.Option(None, "--topk", help=TOPK_HELP.replace("default 5,10,20", "default: the run's own")),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the result JSON here (atomically)."),
    device: str = typer.Option("auto", "--device", help="Where the model computes: auto (a GPU when present), cpu, cuda, cuda:N or mps."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (no table)."),
) -> None:
    """Score a saved model again (its best weights) on valid and test, on any protocol, without
    training. A federated model folder is scored the way its run scored it: each client's
    users with global + that client's private parameters, pooled over the clients given."""
    from fedrec.config import parse_assignments
    from fedrec.train import evaluate_saved

    if saved.is_dir():
        from fedrec.federated.model import evaluate_federated

        try:
            _check_outputs(("--out", out))
            if data or protocols or negatives_file is not None or config:
                raise FedrecError("a federated model folder is scored on its run's own data and protocol: "
                                  "--data/--protocol/--negatives-file/--config do not apply (use --node-config)")
            result = evaluate_federated(saved, clients=list(clients) if clients else None,
                                        node_config=parse_assignments(node_config, what="--node-config") if node_config else None,
                                        device=_checked_device(device), topk=topk)
        except FedrecError as exc:
            _fail(exc)
        _report_federated(result, out, as_json, [f"{result['algorithm']} model of round {result['round']}, clients "
                                                 f"{result['clients']} ({result['task']}, {result['protocol']})"])
        return
    try:
        _check_outputs(("--out", out))
        split = _centralised_split(data, config, federated_options=bool(clients or node_config))
        result = evaluate_saved(saved, split, protocols=list(protocols) if protocols else None,
                                negatives_file=negatives_file, device=_checked_device(device), topk=topk)
    except FedrecError as exc:
        _fail(exc)
    result["data"] = data
    if out is not None:
        _write_json_atomic(result, out)
    if as_json:
        typer.echo(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    for name, stages in result["by_protocol"].items():
        table = Table(title=f"{result['model']} ({result['task']}, {name}), best epoch {result['best_epoch']}")
        table.add_column("metric")
        for stage in stages:
            table.add_column(stage, justify="right")
        for key in next(iter(stages.values())):
            table.add_row(key, *("-" if m.get(key) is None else f"{m[key]:.4f}" for m in stages.values()))
        Console().print(table)


def _simulate_resolve(data: Optional[str], config: Optional[Path], sets: Optional[list[str]],
                      federation: Optional[Path] = None, **given):
    """Flat run-config keys from the per-dataset defaults (:mod:`fedrec.defaults`), a TOML
    file, --set and explicit options (in that order of precedence, last wins) -> ``(RunSpec,
    Resolved)``. With ``federation`` (a folder of ``fedrec data partition``), the defaults
    are those of its manifest's source, and the clients and population are the folder's.
    Reads no data (only a federation folder's manifest)."""
    from fedrec.config import load_toml, parse_assignments
    from fedrec.defaults import resolve
    from fedrec.federated.spec import parse_run_config

    file_cfg = load_toml(config) if config else {}
    model_table = file_cfg.pop("model", {}) if isinstance(file_cfg.get("model"), dict) else {}
    federation = federation or (Path(file_cfg["federation"]) if file_cfg.get("federation") else None)
    manifest = None
    user: dict = dict(file_cfg)
    user.update({f"model.{k}": v for k, v in model_table.items()})
    user.update(_simulate_assignments(sets, algorithm=given.get("algorithm") or file_cfg.get("algorithm"),
                                      model=given.get("model") or file_cfg.get("model"), data=data))
    user.update({k: v for k, v in given.items() if v is not None})
    if data:
        user["data"] = data
    if federation is not None:
        from fedrec.data.federation import load_manifest

        if data:
            raise FedrecError("give either --data or --federation, not both")
        user.pop("federation", None)
        manifest = load_manifest(federation)
        data = manifest["source"]
    else:
        data = data or file_cfg.get("data") or DEFAULT_SIMULATION_DATA
    resolved = resolve(data, runtime="federated", user=user)
    derived: dict = {"data": data}
    if manifest is not None:
        clients = len(manifest["clients"])
        if given.get("shards") not in (None, clients):
            raise FedrecError(f"--clients {given['shards']}: the federation folder {federation} has {clients} clients")
        derived.update({"federation": str(Path(federation).resolve()), "shards": clients})
        if "population" not in resolved.options:
            derived["population"] = int(manifest["population"])
    resolved.options.update(derived)
    resolved.defaults = {k: v for k, v in resolved.defaults.items() if k not in derived}
    return parse_run_config(resolved.options), resolved


def _simulate_assignments(sets: Optional[list[str]], *, algorithm: Optional[str], model: Optional[str],
                          data: Optional[str]) -> dict:
    """``fedrec simulate --set`` items as run-config keys: a run-config key as it is (or as
    ``train.KEY``), ``model.KEY`` a model option; a bare key that is no run-config key but an
    option of the algorithm's model becomes ``model.KEY`` (as in ``fedrec train``). Anything
    else stays as given, so the run config's check names it with the known keys."""
    import dataclasses

    from fedrec.config import parse_assignments
    from fedrec.federated.config import FederatedConfig
    from fedrec.federated.spec import RunSpec

    run_keys = (_option_names(FederatedConfig) | {f.name.replace("_", "-") for f in dataclasses.fields(RunSpec)}
                | {"model-options"})
    out: dict = {}
    pending = {}
    for key, value in parse_assignments(sets).items():
        name = str(key)
        if name.startswith("train."):
            name = name[len("train."):]
            if name.replace("_", "-") not in run_keys:
                raise ConfigError(f"--set {key}: unknown run-config key '{name}' (known: {', '.join(sorted(run_keys))}; "
                                  "model options as model.KEY)")
        kebab = name.replace("_", "-")
        if name.startswith("model.") or kebab in run_keys:
            out[name] = value
        else:
            pending[name] = value
    if pending:
        from fedrec.defaults import algorithm_model, default_algorithm

        try:
            name = model or algorithm_model(algorithm or default_algorithm(data or DEFAULT_SIMULATION_DATA))
        except FedrecError:
            name = model or ""
        model_keys = _model_option_names(name) if name else set()
        for key, value in pending.items():
            out[f"model.{key}" if key.replace("_", "-") in model_keys else key] = value
    return out


def _simulate_spec(data: Optional[str], config: Optional[Path], sets: Optional[list[str]],
                   federation: Optional[Path] = None, **given):
    """The :class:`~fedrec.federated.spec.RunSpec` of :func:`_simulate_resolve`."""
    return _simulate_resolve(data, config, sets, federation, **given)[0]


@app.command("simulate", epilog=DEFAULTS_HELP)
def simulate_command(
    algorithm: Optional[str] = typer.Option(None, "--algorithm", "-a", help="mrff, mrff-nogroups, fedavg, local, fedmf, pfedrec or unicdr (cross-domain; default: the data format's, else mrff)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Data spec FORMAT:PATH[?key=value&...] (default: synthetic:users=600)."),
    federation: Optional[Path] = typer.Option(None, "--federation", help="A federation folder (`fedrec data partition`): each client reads only its own file; instead of --data."),
    task: Optional[str] = typer.Option(None, "--task", help="ctr, next_item or cdr (default: from the data format)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model (default: the algorithm's own)."),
    clients: Optional[int] = typer.Option(None, "--clients", "-n", help="Number of clients (shards of users)."),
    rounds: Optional[int] = typer.Option(None, "--rounds", "-r", help="Communication rounds (default: from the data format, else 100)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (init, participation, dropout)."),
    target_epsilon: Optional[float] = typer.Option(None, "--target-epsilon", help="User-level DP: calibrate the noise so the whole run ends within this epsilon (turns DP on)."),
    delta: Optional[float] = typer.Option(None, "--delta", help="DP delta (default: 0.01 / population, the number of users of the federation; above 1 / population warns)."),
    noise_multiplier: Optional[float] = typer.Option(None, "--noise-multiplier", help="User-level DP: noise std / clipping norm (turns DP on; instead of --target-epsilon)."),
    max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm", help="User-level DP: clip each user's pseudo-gradient to this L2 norm (default 1.0)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Clients' learning rate (the run-config key lr)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Minibatch size of silo algorithms (unicdr: a client per domain); the one-client-per-user engine trains each user on its own sequence and refuses it."),
    device: Optional[str] = typer.Option(None, "--device", help="Where the clients compute: auto (a GPU when present; the default), cpu, cuda, cuda:N or mps."),
    log_dir: Optional[Path] = typer.Option(None, "--log-dir", help="Experiment log: metrics.jsonl (one line per round) and TensorBoard events (when installed) in this folder."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file of flat run-config keys (and an optional [model] table)."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="An option KEY=VALUE (repeatable): a run-config key (lr=0.05, or train.lr=0.05), a model option (model.dim=64; a bare key that is no run-config key is a model option of the algorithm's model)."),
    app_dir: Optional[Path] = typer.Option(None, "--app", help="Flower app directory (default: the nearest with [tool.flwr.app])."),
    topk: Optional[str] = typer.Option(None, "--topk", help=TOPK_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the result JSON here (atomically)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (no table)."),
) -> None:
    """Run a federated simulation in this process through the project's Flower ServerApp and
    ClientApp (no Ray); report valid and test metrics at the best validation round (with
    differential privacy, `test.epsilon` is the epsilon of the whole run)."""
    from fedrec.federated.runner import run_in_process

    try:
        if clients is not None and clients < 1:
            raise FedrecError(f"--clients must be >= 1 (got {clients})")
        if log_dir is not None:
            from fedrec.logs import check_log_dir

            check_log_dir(log_dir)  # before any data is read
        _check_outputs(("--out", out))
        spec, resolved = _simulate_resolve(data, config, sets, federation, algorithm=algorithm, task=task, model=model,
                                           shards=clients, rounds=rounds, seed=seed, lr=lr, device=device, topk=topk,
                                           **{"target-epsilon": target_epsilon, "delta": delta,
                                              "noise-multiplier": noise_multiplier, "max-grad-norm": max_grad_norm,
                                              "batch-size": batch_size})
        if log_dir is not None:  # where the log goes is not an option of the run (not recorded)
            spec.federated.log_dir = str(log_dir)
        _check_outputs(("run config 'out'", spec.out or None))
        _check_outputs(("run config 'checkpoint-dir'", spec.checkpoint_dir or None),
                       ("run config 'model-dir'", spec.model_dir or None), folder=True)
        if batch_size is not None and spec.algorithm != "unicdr":
            raise FedrecError(f"--batch-size applies to silo algorithms (unicdr); algorithm '{spec.algorithm}' trains "
                              "each user's own sequence per step (its vectorised chunk is --set chunk-size=N)")
        _check_topk_task(spec.task, resolved.user)
        result = run_in_process(spec, app_dir=app_dir, progress=not as_json and sys.stderr.isatty())
    except FedrecError as exc:
        _fail(exc)
    result["resolved"] = resolved.record()
    if spec.out:  # the run config's own 'out' gets the same JSON as --out
        _write_json_atomic(result, Path(spec.out))
    _report_federated(result, out, as_json, [
        f"{result['algorithm']} on {result['data']} ({result['task']}), {result['rounds']} rounds, "
        f"{result['nodes']} client(s), {result['seconds']} s",
        f"best round {result['best_round']} (selected on {result['selection']})"])


def _report_federated(result: dict, out: Optional[Path], as_json: bool, header: list[str]) -> None:
    """Write ``result`` to ``out`` (when given) and print it: one JSON object, or the header
    lines and the valid/test metrics."""
    if out is not None:
        _write_json_atomic(result, out)
    if as_json:
        typer.echo(json.dumps(result))
        return
    for line in header:
        typer.echo(line)
    for stage in ("valid", "test"):
        values = ", ".join(f"{k} {v:.4f}" for k, v in result[stage].items() if isinstance(v, float))
        typer.echo(f"  {stage}: {values}")


@app.command("compare", epilog=DEFAULTS_HELP.replace("your flags, --set and --config keys win",
                                                       "the comparison file's keys win"))
def compare_command(
    config: Optional[Path] = typer.Argument(None, metavar="CONFIG", help="Comparison TOML (see fedrec.compare; examples in simulations/configs/); or --config."),
    config_option: Optional[Path] = typer.Option(None, "--config", help="The comparison TOML (instead of the CONFIG argument, as in `fedrec train` and `simulate`)."),
    seeds: Optional[list[int]] = typer.Option(None, "--seed", help="Seeds (repeatable; default 0 1 2)."),
    only: Optional[list[str]] = typer.Option(None, "--only", help="Run only these row names (repeatable)."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="An option KEY=VALUE for every row, over the file's keys (repeatable): a training option of the centralised rows and/or a run-config key of the federated rows (lr=0.01, epochs=5, rounds=10; or train.KEY), or a model option (model.dim=64). Overridden rows run afresh."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate of every row (as --set lr=...)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs of every centralised row (as --set epochs=...)."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Rounds of every federated row (as --set rounds=...)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size of every centralised row and silo federated row (as --set batch-size=...)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (a GPU when present; the default), cpu, cuda, cuda:N or mps, for every row (does not change a row's fingerprint)."),
    log_dir: Optional[Path] = typer.Option(None, "--log-dir", help="Experiment logs: LOG_DIR/<row>/seed<k>/ (metrics.jsonl, TensorBoard events when installed)."),
    out: Path = typer.Option(Path("results"), "--out", help="Folder for <name>.json/.md/.csv/_curves.png."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Replaces {data_root} in the config's data spec."),
    app_dir: Optional[Path] = typer.Option(None, "--app", help="Flower app directory for the federated rows (default: the nearest with [tool.flwr.app], else the installed one)."),
) -> None:
    """Run federated and centralised configurations on the same split; write a table
    (terminal, Markdown, CSV) and learning curves (PNG). Finished runs are kept (resumable)."""
    from fedrec.compare import apply_overrides, load_comparison, run_comparison
    from fedrec.config import parse_assignments

    try:
        if (config is None) == (config_option is None):
            raise FedrecError("give the comparison file once: as the CONFIG argument or as --config")
        _check_outputs(("--out", out), folder=True)
        for seed in seeds or []:
            if seed < 0:
                raise FedrecError(f"--seed must be >= 0 (got {seed})")
        config = config if config is not None else config_option
        if device is not None:
            _checked_device(device)
        if log_dir is not None:
            from fedrec.logs import check_log_dir

            check_log_dir(log_dir)
        cfg = load_comparison(config, data_root=data_root)
        overrides = parse_assignments(sets)
        overrides.update({k: v for k, v in (("lr", lr), ("epochs", epochs), ("rounds", rounds),
                                            ("batch-size", batch_size)) if v is not None})
        if overrides:
            cfg = apply_overrides(cfg, overrides)

        def report(key, result):
            typer.echo(f"{key}: test {json.dumps(result['test'])} ({result['seconds']} s)", err=True)

        run_comparison(cfg, seeds=list(seeds or [0, 1, 2]), out_dir=out, only=list(only or []) or None,
                       on_result=report, app_dir=app_dir,
                       runtime={"device": device, "log_dir": None if log_dir is None else str(log_dir)})
    except FedrecError as exc:
        _fail(exc)
    typer.echo((out / f"{cfg['stem']}.md").read_text())
    typer.echo(f"wrote {out / (cfg['stem'] + '.json')}, .md, .csv and {cfg['stem']}_curves.png")


@app.command("defaults", epilog="In `fedrec train`, `simulate` and `compare` the user's flags, --set and "
                                 "--config keys always win over these; each run's JSON records both under 'resolved'.")
def defaults_command(
    data: str = typer.Argument(..., metavar="SPEC", help="Data spec FORMAT:PATH (only the format is read; no file is opened)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The model of `fedrec train` (see `fedrec models`; default: the format's default algorithm's model, unicdr on cdr:, else mrff)."),
    algorithm: Optional[str] = typer.Option(None, "--algorithm", "-a", help="The algorithm of `fedrec simulate` (it trains its own model; default: the format's, unicdr on cdr:, else mrff)."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="A model option KEY=VALUE (as --set of `fedrec train`), to see how it resolves in both commands (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: {train: resolved, simulate: resolved}."),
) -> None:
    """Print the options a bare `fedrec train --model M --data SPEC` and `fedrec simulate
    --algorithm A --data SPEC` would use (the per-dataset defaults, fedrec/defaults.py), and
    where each comes from, without training."""
    from fedrec.defaults import FORMATS
    from fedrec.config import build_config
    from fedrec.models.registry import MODELS
    from fedrec.train import TrainConfig

    try:
        from fedrec.defaults import algorithm_model, default_algorithm

        algorithm = algorithm or default_algorithm(data)
        model = model or algorithm_model(default_algorithm(data))
        train_resolved, _ = _train_resolve(model, data, None, sets)
        _, sim_resolved = _simulate_resolve(data, None, [f"model.{s}" for s in sets or []], algorithm=algorithm)
        # the options must build (as `fedrec train` would build them, before reading any data)
        options = train_resolved.options
        build_config(TrainConfig, {k: v for k, v in options.items() if k != "task" and not k.startswith("model.")},
                     where="train")
        spec = MODELS.create(model)
        if spec.config is None and train_resolved.model_options():
            raise FedrecError(f"model '{model}' takes no options (got {', '.join(train_resolved.model_options())})")
        if spec.config is not None:
            build_config(spec.config, train_resolved.model_options(), where=f"model '{model}'",
                         task=options.get("task", "ctr"), **dict(spec.fixed))
    except FedrecError as exc:
        _fail(exc)
    both = {"train": train_resolved.record(), "simulate": sim_resolved.record()}
    if as_json:
        typer.echo(json.dumps(both))
        return
    if train_resolved.format in FORMATS:
        typer.echo(f"{data}: format {train_resolved.format}, recorded runs "
                   f"{', '.join(FORMATS[train_resolved.format].recorded) or '(none)'} (simulations/configs/)")
    else:
        typer.echo(f"{data}: no per-dataset defaults for this format (the library's own defaults apply)")
    titles = {"train": f"fedrec train --model {model}",
              "simulate": f"fedrec simulate --algorithm {algorithm} (model {both['simulate']['model']})"}
    for command, rec in both.items():
        title = titles[command]
        typer.echo(f"{title}:")
        for key, value in rec["options"].items():
            source = "default" if key in rec["defaults"] else "given"
            typer.echo(f"  {key} = {_plain_value(value)}  ({source})")


def _plain_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@app.command("recommend")
def recommend_command(
    saved: Path = typer.Argument(..., metavar="FILE|DIR", help="A `fedrec train` --checkpoint file or --resume state, or the model-dir of a federated run."),
    out: Path = typer.Option(..., "--out", help="Where to write the table user, rank, item, score (raw ids): .csv, .parquet or .jsonl."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Data spec of a centralised model's run (the same split)."),
    k: int = typer.Option(10, "--k", help="Items per user."),
    exclude_seen: bool = typer.Option(True, "--exclude-seen/--include-seen", help="Leave out the items each user interacted with (train, valid and test)."),
    users: Optional[Path] = typer.Option(None, "--users", help="Only these users: a file of raw user ids, one a line (default: all users)."),
    clients: Optional[list[Path]] = typer.Option(None, "--client", help="Federated model: a client's model file client-K.pt (repeatable; default: every client-*.pt in DIR)."),
    node_config: Optional[list[str]] = typer.Option(None, "--node-config", help="Federated model: KEY=VALUE replacing a key of the clients' saved node config (repeatable)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Users scored together."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file whose [split] table a centralised run used."),
    domain: Optional[str] = typer.Option(None, "--domain", help="Cross-domain models: recommend items of this domain (centralised; a federated domain client recommends in its own domain)."),
    device: str = typer.Option("auto", "--device", help="Where the model computes: auto (a GPU when present), cpu, cuda, cuda:N or mps."),
) -> None:
    """Top-k items per user from a saved model (centralised, or a federated client's view:
    global + its private parameters, for its own users), written as CSV, Parquet or JSON lines."""
    import time

    import numpy as np
    import pandas as pd

    from fedrec.recommend import raw_user_ids, recommend, users_from_file, write_recommendations

    progress = sys.stderr.isatty()
    start = time.perf_counter()
    try:
        if out.suffix.lower() not in (".csv", ".parquet", ".jsonl"):
            raise FedrecError(f"{out}: unknown output format {out.suffix!r} (accepted suffixes: .csv, .parquet, .jsonl)")
        frames = []
        if saved.is_dir():
            from fedrec.config import parse_assignments
            from fedrec.federated.model import load_federated_model

            if data or config:
                raise FedrecError("a federated model reads each client's own data: --data/--config do not apply "
                                  "(use --node-config)")
            _, models = load_federated_model(saved, clients=list(clients) if clients else None,
                                             node_config=parse_assignments(node_config, what="--node-config") if node_config else None,
                                             device=_checked_device(device))
            if domain is not None:  # cross-domain: the clients of that domain
                models = [m for m in models if m.split.domains and len(m.split.seq_domain) and
                          m.split.domains[int(m.split.seq_domain[0])] == domain]
                if not models:
                    raise FedrecError(f"--domain {domain}: no client of this model holds that domain")
            served = []
            for m in models:
                chosen = users_from_file(users, m.split, unknown="skip") if users else None
                if chosen is not None:
                    served.append(m.split.user_raw[chosen])
                    if len(chosen) == 0:
                        continue
                frames.append(recommend(m.split, m.scorer(), users=chosen, k=k, exclude_seen=exclude_seen,
                                        batch_size=batch_size, progress=progress))
            if users:
                raw, lines = raw_user_ids(users)
                missing = ~np.isin(raw, np.concatenate(served) if served else np.zeros(0, np.int64))
                if missing.any():
                    i = int(np.flatnonzero(missing)[0])
                    raise FedrecError(f"{users}, line {lines[i]}: user {raw[i]} is in none of the clients' data")
        else:
            from fedrec.recommend import centralised_scorer, load_centralised

            split = _centralised_split(data, config, federated_options=bool(clients or node_config))
            model, task, max_len, _ = load_centralised(saved, split, device=_checked_device(device))
            chosen = users_from_file(users, split) if users else None
            frames.append(recommend(split, centralised_scorer(model, split, task, max_len, domain=domain), users=chosen, k=k,
                                    exclude_seen=exclude_seen, batch_size=batch_size, progress=progress))
        frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["user", "rank", "item", "score"])
        write_recommendations(frame, out)
    except FedrecError as exc:
        _fail(exc)
    typer.echo(f"wrote {out}: {frame['user'].nunique():,} users x up to {k} items ({len(frame):,} rows) "
               f"in {time.perf_counter() - start:.1f} s")


@app.command("launch")
def launch_command(
    superlink: Optional[str] = typer.Argument(None, help="A SuperLink connection of $FLWR_HOME/config.toml (default: its default)."),
    run_config: str = typer.Option("", "--run-config", help="Run config overrides, as for `flwr run --run-config` (e.g. 'rounds=10 shards=2')."),
    federation_config: str = typer.Option("", "--federation-config", help="As for `flwr run --federation-config` (simulation runs)."),
    app_dir: Optional[Path] = typer.Option(None, "--app", help="Flower app directory (default: the nearest, else the installed app)."),
    timeout: float = typer.Option(0.0, "--timeout", help="Stop following after this many seconds (0: until the run ends)."),
    log: Optional[Path] = typer.Option(None, "--log", help="Write the run's full log (`flwr log RUN_ID`) to this file (default: fedrec-run-RUN_ID.log in the temporary folder)."),
) -> None:
    """Start a run of the fedrec app on a SuperLink, write its log to a file, and exit 0 only
    when it ends finished:completed (`flwr run --stream` exits 0 even when the run failed).
    A failed run prints one line on stderr: its reason (fedrec's own message when fedrec
    refused the run's input), its status and the log file; exit code 1."""
    from fedrec.federated.runner import find_app_dir
    from fedrec.launch import failure_reason, launch

    def submitted(run_id: int, path: Optional[Path]) -> None:
        typer.echo(f"run {run_id} submitted; its log: {path}")

    try:
        if not timeout >= 0 or timeout == float("inf"):
            raise FedrecError(f"--timeout must be a finite number of seconds >= 0 (got {timeout})")
        _check_outputs(("--log", log))
        done = launch(app_dir or find_app_dir(), superlink, run_config=run_config, federation_config=federation_config,
                      timeout=timeout, log=log, on_submit=submitted)
    except FedrecError as exc:
        _fail(exc)
    if not done.ok:
        reason = failure_reason(done.details) or f"run {done.run_id} ended {done.status}"
        typer.echo(f"fedrec: error: {reason} (run {done.run_id} {done.status}; full log: {done.log})", err=True)
        raise typer.Exit(1)
    typer.echo(f"run {done.run_id}: {done.status}")


inspect_app = typer.Typer(help="Look inside trained models.", no_args_is_help=True)
app.add_typer(inspect_app, name="inspect")


@inspect_app.command("groups")
def inspect_groups(
    data: str = typer.Option("synthetic:", "--data", "-d", help="Data spec the model is (or was) trained on."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="A checkpoint (or --resume state) written by `fedrec train` for a model with groups (mrff), with --data of its run; without it an MRFF model is trained first."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML with [model] and [train] tables (when training)."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Model option KEY=VALUE (when training)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (when training)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (when training)."),
    out: Path = typer.Option(Path("groups"), "--out", help="Folder for groups.json and groups.png."),
    device: str = typer.Option("auto", "--device", help="Where the model computes: auto (a GPU when present), cpu, cuda, cuda:N or mps."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Report how MRFF routes users over groups per layer (and NMI against true groups on synthetic data).

    Without --checkpoint, MRFF is trained first exactly as `fedrec train --model mrff` would
    train it on --data: the per-dataset defaults, under --config, --set and the flags."""
    from fedrec.config import build_config, load_toml
    from fedrec.data import load_dataset
    from fedrec.data.split import SplitConfig, split_dataset
    from fedrec.device import resolve_device
    from fedrec.inspect import group_report, plot_group_report, require_groups, route_users
    from fedrec.models.base import ModelData
    from fedrec.models.registry import create_model
    from fedrec.train import TrainConfig, describe_saved, load_saved, train

    try:
        on = resolve_device(device)
        if checkpoint is not None:  # what the file holds, before any data is read
            require_groups(describe_saved(checkpoint)["model"], str(checkpoint))
        if checkpoint is not None:
            file_cfg = load_toml(config) if config else {}
            split = split_dataset(load_dataset(data), build_config(SplitConfig, file_cfg.get("split", {}), where="split"))
            model, _ = load_saved(checkpoint, split)  # refuses another split, or weights that do not fit
        else:  # the model `fedrec train --model mrff` would train: the same per-dataset defaults
            resolved, split_table = _train_resolve("mrff", data, config, sets, epochs=epochs, seed=seed,
                                                   device=device)
            split = split_dataset(load_dataset(data), build_config(SplitConfig, split_table, where="split"))
            task = resolved.options.get("task", "ctr" if split.has_labels else "next_item")
            if task not in ("ctr", "next_item"):
                raise FedrecError(f"inspect groups: MRFF routes users for the ctr or next_item task (got {task!r})")
            options = resolved.model_options()
            train_options = {k: v for k, v in resolved.options.items() if k != "task" and not k.startswith("model.")}
            train_options.setdefault("progress", not as_json and sys.stderr.isatty())
            result = train("mrff", split, task=task, model_options=options,
                           config=build_config(TrainConfig, train_options, where="train"), data_name=data)
            model = create_model("mrff", ModelData.from_split(split), options, task=task)
            model.load_state_dict(result["model_state"])
        users, routes = route_users(model.to(on), split)
        report = group_report(users, routes, model.cfg.groups, split.user_group)
        report["data"] = data
        if checkpoint is None:  # the options of the training run, as `fedrec train` records them
            report["resolved"] = resolved.record()
    except FedrecError as exc:
        _fail(exc)
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(report, out / "groups.json")
    plot_group_report(report, out / "groups.png")
    if as_json:
        typer.echo(json.dumps(report))
        return
    for entry in report["layers"]:
        line = f"layer {entry['layer']}: users per group {entry['users_per_group']}"
        if "nmi" in entry:
            line += f", NMI {entry['nmi']:.3f} (chance {entry['nmi_chance']:.3f})"
        typer.echo(line)
    if "nmi_combined" in report:
        typer.echo(f"all layers: {report['combinations_used']} combinations, NMI {report['nmi_combined']:.3f} "
                   f"(chance {report['nmi_combined_chance']:.3f})")
    typer.echo(f"wrote {out / 'groups.json'} and {out / 'groups.png'}")


@app.command("models")
def models_command() -> None:
    """List the registered models, the tasks they support, what each is and its paper."""
    from fedrec.models.registry import MODELS

    specs = {name: MODELS.create(name) for name in MODELS.names()}
    tasks = {name: ", ".join(spec.model.tasks) for name, spec in specs.items()}
    name_width, task_width = max(map(len, specs)), max(map(len, tasks.values()))
    for name, spec in specs.items():
        typer.echo(f"{name:{name_width}s}  tasks: {tasks[name]:{task_width}s}  {spec.summary()}")


@app.command("app")
def app_command() -> None:
    """Print the Flower app directory installed with fedrec, for `flwr run "$(fedrec app)" ...`
    from any directory."""
    from fedrec.federated.runner import installed_app_dir

    try:
        typer.echo(str(installed_app_dir()))
    except FedrecError as exc:
        _fail(exc)


def _centralised_split(data: Optional[str], config: Optional[Path], *, federated_options: bool):
    """The split a centralised model was trained on (``--data`` and the ``[split]`` table of
    ``--config``), for ``evaluate`` and ``recommend``."""
    from fedrec.config import build_config, load_toml
    from fedrec.data import load_dataset
    from fedrec.data.split import SplitConfig, split_dataset

    if federated_options:
        raise FedrecError("--client/--node-config apply to a federated model folder only")
    if not data:
        raise FedrecError("--data is needed for a centralised model (the data it was trained on)")
    file_cfg = load_toml(config) if config else {}
    return split_dataset(load_dataset(data), build_config(SplitConfig, file_cfg.get("split", {}), where="split"))


def _write_json_atomic(obj: dict, path: Path) -> None:
    """Write a result atomically; a place that refuses the file (checked up front, but a
    file system can still refuse it: full, read-only, ``/proc``) is one line, exit 2."""
    from fedrec.files import write_json_atomic

    try:
        write_json_atomic(obj, path)
    except OSError as exc:
        _fail(FedrecError(f"{path}: cannot be written ({exc.strerror or type(exc).__name__})"))


def _print_result(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['model']} on {result['data']} ({result['task']}, {result['protocol']})")
    table.add_column("metric")
    table.add_column("valid", justify="right")
    table.add_column("test", justify="right")
    for key in result["test"]:
        v, t = result["valid"].get(key), result["test"][key]
        table.add_row(key, "-" if v is None else f"{v:.4f}", "-" if t is None else f"{t:.4f}")
    Console().print(table)
    typer.echo(f"best epoch {result['best_epoch']} of {result['epochs_run']} ({result['selection']}), "
               f"{result['seconds']:.1f} s, {result['parameters']:,} parameters")


@data_app.command("formats")
def data_formats() -> None:
    """List the data formats a SPEC can name, with the first line of their documentation."""
    from fedrec.data.sources import SOURCES

    for name in SOURCES.names():
        doc = (sys.modules[SOURCES.get(name).__module__].__doc__ or "").strip().splitlines()
        typer.echo(f"{name:10s} {doc[0] if doc else ''}")


def _print_stats(stats: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=stats["data"], show_header=False)
    table.add_column("statistic", style="bold")
    table.add_column("value")
    label = "n/a (implicit feedback)" if stats["label_rate"] is None else f"{stats['label_rate']:.4f}"
    rows = [
        ("users", f"{stats['users']:,}"),
        ("items", f"{stats['items']:,}"),
        ("interactions", f"{stats['interactions']:,}"),
        ("density", f"{stats['density']:.6f}"),
        ("label rate", label),
    ]
    if stats["rating"]:
        r = stats["rating"]
        rows.append(("rating", f"{r['min']:g}..{r['max']:g}, mean {r['mean']:.3f}"))
    if stats.get("value"):
        v = stats["value"]
        rows.append(("value", f"{v['min']:g}..{v['max']:g}, mean {v['mean']:.3f}"))
    sl = stats["sequence_length"]
    rows.append(
        ("interactions per user",
         f"min {sl['p0']:g} / p25 {sl['p25']:g} / median {sl['p50']:g} / p75 {sl['p75']:g} / "
         f"p90 {sl['p90']:g} / max {sl['p100']:g} / mean {sl['mean']:.2f}")
    )
    rows.append(("repeated (user, item) rows", f"{stats['repeated_pairs']:,}"))
    if stats["domains"]:
        for name, d in stats["domains"].items():
            text = f"{d['users']:,} users, {d['items']:,} items, {d['interactions']:,} interactions"
            if d.get("splits"):
                text += " (" + ", ".join(f"{s} {c['interactions']:,}" for s, c in d["splits"].items()) + ")"
            rows.append((f"domain {name}", text))
        rows.append(("users in all domains", f"{stats['users_in_all_domains']:,}"))
    elif stats["splits"]:
        rows.append(("splits", ", ".join(f"{s} {c['interactions']:,}" for s, c in stats["splits"].items())))
    if stats["user_features"]:
        rows.append(("user features", ", ".join(stats["user_features"])))
    if stats["item_features"]:
        rows.append(("item features", ", ".join(stats["item_features"])))
    if stats.get("true_groups"):
        rows.append(("true groups (users)", ", ".join(f"{k}: {v}" for k, v in stats["true_groups"].items())))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def help_text(text: str) -> str:
    """A help text as ``--help`` must render it literally: RST literals (double back-quotes)
    become single back-quotes, and square brackets (``[model]``, ``[tool.flwr.app]``) are
    escaped so that rich does not take them for markup (``\\[`` already escaped stays one
    escape)."""
    from rich.markup import escape

    text = re.sub(r"``(.+?)``", r"`\1`", text, flags=re.S)
    return escape(text.replace("\\[", "["))


def _literal_help(typer_app: typer.Typer) -> None:
    """Pass every help text of ``typer_app`` (its commands' docstrings, help and epilog, each
    option's and argument's help, and its sub-apps', recursively) through :func:`help_text`,
    so that each is shown as written. Idempotent; run once every command is registered."""
    import inspect

    from typer.models import ParameterInfo

    if isinstance(typer_app.info.help, str):
        typer_app.info.help = help_text(typer_app.info.help)
    callbacks = [typer_app.registered_callback.callback] if typer_app.registered_callback else []
    for command in typer_app.registered_commands:
        doc = command.help if command.help is not None else inspect.getdoc(command.callback)
        command.help = None if doc is None else help_text(doc)
        if isinstance(command.epilog, str):
            command.epilog = help_text(command.epilog)
        callbacks.append(command.callback)
    for callback in callbacks:
        for parameter in inspect.signature(callback).parameters.values():
            if isinstance(parameter.default, ParameterInfo) and isinstance(parameter.default.help, str):
                parameter.default.help = help_text(parameter.default.help)
    for group in typer_app.registered_groups:
        if isinstance(group.help, str):
            group.help = help_text(group.help)
        _literal_help(group.typer_instance)


_literal_help(app)

if __name__ == "__main__":  # pragma: no cover
    app()
