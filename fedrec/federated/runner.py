"""Run the project's Flower ServerApp and ClientApp in this process, without Ray or a SuperLink.

The apps are found the way ``flwr run`` finds them — from ``[tool.flwr.app.components]`` of
the app directory's ``pyproject.toml`` — and driven through an in-process ``Grid``: each
simulated SuperNode is a :class:`flwr.app.Context` (its ``node_config`` carries
``partition-id`` / ``num-partitions``, its ``state`` persists across rounds), and a message
is delivered by calling the ClientApp directly. Same code, same messages, same result as
``flwr run .`` on the simulation engine; seconds instead of minutes for small runs.
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
from fedrec.federated.spec import RunSpec

__all__ = ["InProcessGrid", "load_components", "run_in_process", "find_app_dir"]

_SERVER_NODE = 0


def find_app_dir(start: str | Path = ".") -> Path:
    """The nearest directory (``start`` or a parent) whose pyproject.toml declares Flower
    components."""
    here = Path(start).resolve()
    for d in [here, *here.parents]:
        p = d / "pyproject.toml"
        if p.exists() and "components" in load_toml(p).get("tool", {}).get("flwr", {}).get("app", {}):
            return d
    raise ConfigError(f"no pyproject.toml with [tool.flwr.app.components] in {here} or its parents "
                      "(run from the fedrec project, or pass --app DIR)")


def load_components(app_dir: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """``(server_app, client_app, default_run_config)`` from ``app_dir/pyproject.toml``."""
    app_dir = Path(app_dir).resolve()
    cfg = load_toml(app_dir / "pyproject.toml").get("tool", {}).get("flwr", {}).get("app", {})
    comps = cfg.get("components", {})
    if "serverapp" not in comps or "clientapp" not in comps:
        raise ConfigError(f"{app_dir / 'pyproject.toml'}: [tool.flwr.app.components] needs serverapp and clientapp")
    if str(app_dir) not in sys.path:
        sys.path.insert(0, str(app_dir))

    def load(ref: str):
        module, _, attr = ref.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"{app_dir / 'pyproject.toml'}: cannot load component {ref!r} ({exc})") from None

    return load(comps["serverapp"]), load(comps["clientapp"]), dict(cfg.get("config", {}))


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process (one Context per node)."""

    def __init__(self, client_app: Any, contexts: dict[int, Context], run_id: int, progress=None) -> None:
        self.client_app = client_app
        self.contexts = contexts
        self._run_id = run_id
        self._replies: dict[str, Message] = {}
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
                reply = self.client_app(msg, self.contexts[node])
            finally:
                _set_identity(self._run_id, _SERVER_NODE)
            self._replies[msg_id] = reply
            ids.append(msg_id)
            if self.progress is not None and msg.metadata.message_type.startswith("train"):
                self.progress.update(1)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids``."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull (delivery is synchronous)."""
        return self.pull_messages(self.push_messages(messages))


def _set_identity(run_id: int, node_id: int) -> None:
    # Flower's Message constructor reads the sender's identity from this process-wide
    # holder (internal API; set the way flwr's own runtimes do)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id


def run_in_process(spec: RunSpec, *, app_dir: str | Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Run ``spec`` through the project's ServerApp and ClientApp in this process; return the
    server's result dict (see :class:`fedrec.federated.history.RunHistory`)."""
    server_app, client_app, _ = load_components(app_dir or find_app_dir())
    shards = spec.shards or 1
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
    return result
