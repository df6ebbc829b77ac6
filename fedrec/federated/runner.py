"""Run the project's Flower ServerApp and ClientApp in this process, without Ray or a SuperLink.

The apps are found the way ``flwr run`` finds them — from ``[tool.flwr.app.components]`` of
the app directory's ``pyproject.toml`` (:func:`find_app_dir`: the nearest one from the
working directory up, else the app installed with fedrec, so no checkout is needed) — and
driven through an in-process ``Grid``: each simulated SuperNode is a
:class:`flwr.app.Context` (its ``node_config`` carries ``partition-id`` / ``num-partitions``,
its ``state`` persists across rounds), and a message is delivered by calling the ClientApp
directly. Same code, same messages, same result as
``flwr run .`` on the simulation engine; seconds instead of minutes for small runs.

Time is simulated where a ClientApp waits: a straggler's delay
(:func:`fedrec.federated.failures.wait`) advances a virtual clock instead of sleeping, and
``send_and_receive(timeout=T)`` leaves out the replies whose simulated delay exceeds ``T``,
as a real Grid would after waiting ``T`` seconds (compute time is not counted).
"""

from __future__ import annotations

import copy
import importlib
import json
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

from fedrec.config import load_toml
from fedrec.errors import ConfigError
from fedrec.federated.failures import virtual_clock
from fedrec.federated.flower_errors import raising_fedrec_errors
from fedrec.federated.spec import RunSpec

__all__ = ["InProcessGrid", "load_components", "run_in_process", "find_app_dir", "installed_app_dir",
           "check_ctr_classes"]

_SERVER_NODE = 0


def _declares_components(directory: Path) -> bool:
    p = directory / "pyproject.toml"
    return p.is_file() and "components" in load_toml(p).get("tool", {}).get("flwr", {}).get("app", {})


def installed_app_dir() -> Path:
    """The Flower app installed with the ``fedrec`` package: ``fedrec/flower-app`` in a wheel
    install (clients/, server/ and pyproject.toml bundled by the build), or the source tree
    ``fedrec`` was imported from in an editable install (``pip install -e .``)."""
    import fedrec

    package = Path(fedrec.__file__).resolve().parent
    candidates = (package / "flower-app", package.parent)
    for d in candidates:
        if _declares_components(d):
            return d
    raise ConfigError(f"no Flower app installed with fedrec (looked in {', '.join(str(d) for d in candidates)}); "
                      "reinstall fedrec, or pass --app DIR")


def find_app_dir(start: str | Path = ".") -> Path:
    """The Flower app to run: the nearest directory (``start`` or a parent) whose
    pyproject.toml declares Flower components, else the app installed with fedrec
    (:func:`installed_app_dir`). An explicit ``--app DIR`` goes before both."""
    here = Path(start).resolve()
    for d in [here, *here.parents]:
        if _declares_components(d):
            return d
    try:
        return installed_app_dir()
    except ConfigError as exc:
        raise ConfigError(f"no pyproject.toml with [tool.flwr.app.components] in {here} or its parents, "
                          f"and {exc}") from None


def _inside(path: str | None, directory: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(directory)


def _module_paths(module: Any) -> list[str]:
    paths = list(getattr(module, "__path__", None) or [])
    return paths or [p for p in [getattr(module, "__file__", None)] if p]


def _import_from(top: str, app_dir: Path, where: Path) -> None:
    """Make ``sys.modules[top]`` the top-level module ``top`` of ``app_dir``, whatever else
    is importable under that name (an earlier sys.path entry, a meta-path finder); refuse
    when a *different* ``top`` is already imported (its submodules would silently be used)."""
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec

    spec = PathFinder.find_spec(top, [str(app_dir)])
    if spec is None:
        raise ConfigError(f"{where}: no module {top!r} in {app_dir}")
    loaded = sys.modules.get(top)
    if loaded is not None:
        paths = _module_paths(loaded)
        if not any(_inside(p, app_dir) for p in paths):
            raise ConfigError(f"{where}: a different module {top!r} is already imported in this process "
                              f"(from {', '.join(paths) or 'an unknown location'}), so the app in {app_dir} "
                              f"cannot be loaded; run it in a fresh process, or rename the other {top!r}")
        return
    module = module_from_spec(spec)
    sys.modules[top] = module
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except BaseException:
        sys.modules.pop(top, None)
        raise


def load_components(app_dir: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """``(server_app, client_app, default_run_config)`` from ``app_dir/pyproject.toml``.

    The component modules (``server.app``, ``clients.app``) are imported from ``app_dir``
    itself: a same-named package elsewhere on sys.path cannot shadow them, and one already
    imported from elsewhere is a :class:`ConfigError` naming both places."""
    app_dir = Path(app_dir).resolve()
    where = app_dir / "pyproject.toml"
    if not where.is_file():
        raise ConfigError(f"{app_dir}: not a Flower app directory (no pyproject.toml)")
    cfg = load_toml(where).get("tool", {}).get("flwr", {}).get("app", {})
    comps = cfg.get("components", {})
    if "serverapp" not in comps or "clientapp" not in comps:
        raise ConfigError(f"{where}: [tool.flwr.app.components] needs serverapp and clientapp")
    if str(app_dir) not in sys.path:
        sys.path.insert(0, str(app_dir))

    def load(ref: str):
        module, _, attr = ref.partition(":")
        try:
            _import_from(module.split(".")[0], app_dir, where)
            loaded = importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"{where}: cannot load component {ref!r} ({exc})") from None
        if not _inside(getattr(loaded, "__file__", None), app_dir):
            raise ConfigError(f"{where}: component module {module!r} was imported from "
                              f"{getattr(loaded, '__file__', None)}, not from {app_dir}")
        try:
            return getattr(loaded, attr)
        except AttributeError as exc:
            raise ConfigError(f"{where}: cannot load component {ref!r} ({exc})") from None

    return load(comps["serverapp"]), load(comps["clientapp"]), dict(cfg.get("config", {}))


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process (one Context per node)."""

    def __init__(self, client_app: Any, contexts: dict[int, Context], run_id: int, progress=None) -> None:
        self.client_app = client_app
        self.contexts = contexts
        self._run_id = run_id
        self._replies: dict[str, Message] = {}
        self._delays: dict[str, float] = {}  # message id -> simulated seconds its reply came late
        self.progress = progress

    def set_run(self, run: Any) -> None:  # pragma: no cover - not used in-process
        """Unused: the run is fixed at construction."""

    @property
    def run(self) -> Any:
        """A minimal Run (only ``run_id`` is meaningful)."""
        from flwr.supercore.run import Run

        return Run.create_empty(self._run_id)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """Build a message to ``dst_node_id``."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The simulated nodes."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node's ClientApp now; keep the replies."""
        ids = []
        for msg in messages:
            msg_id = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = msg_id
            node = msg.metadata.dst_node_id
            if node not in self.contexts:
                raise RuntimeError(f"message to unknown node {node}")
            # each node gets its own copy, as over a real transport (Flower's mods, e.g.
            # secaggplus_mod, modify the content they receive)
            msg.content = copy.deepcopy(msg.content)
            _set_identity(self._run_id, node)
            try:
                # a node's bad input is the run's one-line error, as it is; simulated delays
                # (stragglers) advance a clock instead of sleeping
                with raising_fedrec_errors(), virtual_clock() as clock:
                    reply = self.client_app(msg, self.contexts[node])
            finally:
                _set_identity(self._run_id, _SERVER_NODE)
            self._replies[msg_id] = reply
            if clock[0] > 0:
                self._delays[msg_id] = clock[0]
            ids.append(msg_id)
            if self.progress is not None and msg.metadata.message_type.startswith("train"):
                self.progress.update(1)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids``."""
        for i in message_ids:
            self._delays.pop(i, None)
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull (delivery is synchronous); with ``timeout``, a reply whose
        simulated delay exceeds it never arrives."""
        ids = list(self.push_messages(messages))
        if timeout is not None:
            late = [i for i in ids if self._delays.get(i, 0.0) > timeout]
            for i in late:  # the server stopped waiting: these replies are lost
                self._replies.pop(i, None)
            ids = [i for i in ids if i not in set(late)]
        return self.pull_messages(ids)


def _set_identity(run_id: int, node_id: int) -> None:
    # Flower's Message constructor reads the sender's identity from this process-wide
    # holder (internal API; set the way flwr's own runtimes do)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id


def check_ctr_classes(split) -> None:
    """CTR: the held-out rows of each stage (valid, test) need clicks and non-clicks, else
    AUC is undefined; refused before the first round (as ``fedrec train`` does). Data
    without labels is left to the algorithm's own message."""
    import numpy as np

    if not split.has_labels:
        return
    for part, stage in ((1, "valid"), (2, "test")):
        labels = np.unique(split.label[split.part == part])
        if len(labels) == 1:
            raise ConfigError(f"task 'ctr': every {stage} impression has label {int(labels[0])}, so AUC is "
                              "undefined; the data needs both clicks (1) and non-clicks (0) in its held-out rows "
                              "(or use --task next_item)")


def run_in_process(spec: RunSpec, *, app_dir: str | Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Run ``spec`` through the project's ServerApp and ClientApp in this process; return the
    server's result dict (see :class:`fedrec.federated.history.RunHistory`)."""
    server_app, client_app, _ = load_components(app_dir or find_app_dir())
    shards = spec.shards or 1
    if spec.federation:
        from fedrec.data.federation import load_manifest

        clients = len(load_manifest(spec.federation)["clients"])
        if spec.shards and spec.shards != clients:
            raise ConfigError(f"run config 'shards' is {spec.shards}, but the federation folder {spec.federation} "
                              f"has {clients} clients")
        shards = clients
    if spec.task == "ctr" and not spec.federation:  # one dataset: its held-out labels are known here, before a round
        from fedrec.federated.nodedata import whole_dataset_view

        split = whole_dataset_view(spec.data, shards=shards, partition=spec.partition, alpha=spec.partition_alpha,
                                   seed=spec.partition_seed)[1]  # the nodes' own load (cached per process)
        check_ctr_classes(split)
    with tempfile.TemporaryDirectory(prefix="fedrec-run-") as tmp:
        out = Path(tmp) / "result.json"
        flat = {**spec.to_flat(), "shards": shards, "out": str(out)}
        run_id = 1
        contexts = {i + 1: Context(run_id=run_id, node_id=i + 1,
                                   node_config={"partition-id": i, "num-partitions": shards},
                                   state=RecordDict(), run_config=dict(flat)) for i in range(shards)}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=spec.federated.rounds * shards, desc=f"{spec.algorithm} rounds x shards", unit="msg")
        grid = InProcessGrid(client_app, contexts, run_id, progress=bar)
        import logging

        flwr_logger = logging.getLogger("flwr")
        level = flwr_logger.level
        flwr_logger.setLevel(logging.WARNING)  # Flower logs every round at INFO
        _set_identity(run_id, _SERVER_NODE)
        server_ctx = Context(run_id=run_id, node_id=_SERVER_NODE, node_config={}, state=RecordDict(), run_config=dict(flat))
        try:
            server_app(grid, server_ctx)
        finally:
            flwr_logger.setLevel(level)
            if bar is not None:
                bar.close()
        if not out.exists():
            raise RuntimeError("the ServerApp finished without writing its result")
        result = json.loads(out.read_text())
    result["config"]["out"] = spec.out
    result["runtime"] = "in-process"
    if spec.out:  # the run config's own 'out', as the ServerApp writes it in a deployment
        from fedrec.files import write_json_atomic

        write_json_atomic(result, spec.out)
    return result
