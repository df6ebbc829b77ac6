"""Start a run of the fedrec Flower app on a SuperLink and exit by how the run ended.

``flwr run --stream`` exits 0 even when the ServerApp failed (the run's status is then
``finished:failed``), and a failed run's log is a long Flower (on the simulation engine,
Ray) traceback with the reason at its end. :func:`launch` submits the run (``flwr run APP
SUPERLINK --format json``: it returns the run id at once), writes its log (``flwr log
RUN_ID --stream``) to a file, polls ``flwr ls --run-id RUN_ID --format json`` until the
status is ``finished:*``, and returns a :class:`Launched`: the status and, for a failed run,
its one-line reason (:func:`failure_reason`: fedrec's own message when fedrec refused
something). ``fedrec launch`` exits 0 only on ``finished:completed``; otherwise it prints
that one line on stderr, naming the log file, and exits 1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fedrec.errors import ConfigError, FedrecError

__all__ = ["launch", "check_run_config", "run_status", "run_details", "failure_reason", "Launched"]

#: how Flower's runtimes start a failed run's status details (the exception's text follows)
_FAILED_PREFIXES = ("ServerApp failed with exception: ", "Simulation failed with exception: ")


@dataclass
class Launched:
    """A run followed to its end: id, final status (``finished:completed`` etc.), the
    status details Flower recorded, and the file holding its log (None when not streamed)."""

    run_id: int
    status: str
    details: str = ""
    log: Path | None = None

    @property
    def ok(self) -> bool:
        """Whether the run completed."""
        return self.status == "finished:completed"


def failure_reason(details: str) -> str:
    """A failed run's reason in one line: the exception's text Flower put in the run's status
    details (for a run fedrec refused, fedrec's own message), without Flower's prefix."""
    text = " ".join(str(details or "").split())
    for prefix in _FAILED_PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text


def _flwr() -> str:
    here = Path(sys.executable).with_name("flwr")
    return str(here) if here.exists() else (shutil.which("flwr") or "flwr")


def _json(done: subprocess.CompletedProcess, what: str) -> dict:
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        tail = (done.stderr or done.stdout).strip().splitlines()
        raise FedrecError(f"{what} failed: {tail[-1] if tail else 'no output'}") from None


def run_details(run_id: int, superlink: str | None = None) -> tuple[str, str]:
    """``(status, status details)`` of run ``run_id`` on ``superlink`` (a connection of
    ``$FLWR_HOME/config.toml``)."""
    args = [_flwr(), "ls", *([superlink] if superlink else []), "--run-id", str(run_id), "--format", "json"]
    out = _json(subprocess.run(args, capture_output=True, text=True, check=False, timeout=120), "flwr ls")
    runs = out.get("runs") or []
    if not runs:
        raise FedrecError(f"flwr ls: no run {run_id} on {superlink or 'the default SuperLink'}")
    return str(runs[0].get("status", "unknown")), str(runs[0].get("status-details", "") or "")


def run_status(run_id: int, superlink: str | None = None) -> str:
    """The status of run ``run_id`` on ``superlink`` (a connection of ``$FLWR_HOME/config.toml``)."""
    return run_details(run_id, superlink)[0]


def check_run_config(app: str | Path, run_config: str = ""):
    """The run spec that ``flwr run APP --run-config RUN_CONFIG`` would give the ServerApp
    (the app's ``[tool.flwr.app.config]`` with the overrides), checked here before anything
    is submitted: a malformed string, an undeclared key or a bad value is a one-line
    :class:`~fedrec.errors.ConfigError` (what the nodes alone can check, e.g. their data
    files, is checked on the nodes)."""
    import click

    from fedrec.config import load_toml
    from fedrec.federated.spec import parse_run_config

    pyproject = Path(app) / "pyproject.toml"
    if not pyproject.is_file():
        raise ConfigError(f"{app}: not a Flower app directory (no pyproject.toml)")
    defaults = load_toml(pyproject).get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    overrides = {}
    if run_config.strip():
        from flwr.common.config import flatten_dict, parse_config_args

        import re

        left = re.sub(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)", " ", run_config).split()  # what flwr would drop
        if left and not run_config.strip().endswith(".toml"):
            raise ConfigError(f"--run-config: cannot read {left[0]!r} (expected KEY=VALUE items, e.g. "
                              "'rounds=10 data=\"synthetic:\"')")
        try:
            overrides = parse_config_args([run_config])
        except click.ClickException as exc:
            raise ConfigError(f"--run-config {run_config!r}: {' '.join(exc.message.split())}") from None
        except (OSError, ValueError) as exc:  # a .toml file that cannot be read, a TOML error
            raise ConfigError(f"--run-config {run_config!r}: {' '.join(str(exc).split())}") from None
        defaults = flatten_dict(defaults)
        unknown = [k for k in overrides if k not in defaults]
        if unknown:
            raise ConfigError(f"--run-config: unknown key '{unknown[0]}' (the app declares: "
                              f"{', '.join(sorted(defaults))})")
    return parse_run_config({**defaults, **overrides})


def default_log_path(run_id: int) -> Path:
    """Where a run's log goes when no ``log`` is given: ``fedrec-run-<id>.log`` in the
    temporary folder."""
    return Path(tempfile.gettempdir()) / f"fedrec-run-{run_id}.log"


def launch(app: str | Path, superlink: str | None = None, *, run_config: str = "", federation_config: str = "",
           timeout: float = 0.0, stream: bool = True, poll: float = 2.0, log: str | Path | None = None,
           on_submit: Callable[[int, Path | None], None] | None = None) -> Launched:
    """Submit a run of ``app`` to ``superlink`` and follow it to its end. Its log is written
    to ``log`` (default: :func:`default_log_path`; nothing with ``stream=False``);
    ``on_submit(run_id, log_path)`` is called once the run is submitted. ``timeout`` > 0
    stops following (the run goes on) after that many seconds: a one-line error. The run
    config is checked first (:func:`check_run_config`): bad input submits nothing."""
    check_run_config(app, run_config)
    args = [_flwr(), "run", str(app), *([superlink] if superlink else []), "--format", "json"]
    if run_config:
        args += ["--run-config", run_config]
    if federation_config:
        args += ["--federation-config", federation_config]
    submitted = _json(subprocess.run(args, capture_output=True, text=True, check=False), "flwr run")
    if not submitted.get("success") or not submitted.get("run-id"):
        reason = submitted.get("error-message") or submitted.get("error") or submitted
        raise FedrecError(f"flwr run: the SuperLink did not start the run ({' '.join(str(reason).split())})")
    run_id = int(submitted["run-id"])
    path = (Path(log) if log else default_log_path(run_id)) if stream else None
    if on_submit is not None:
        on_submit(run_id, path)
    follower = handle = None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed below, after the follower
        follower = subprocess.Popen([_flwr(), "log", str(run_id), *([superlink] if superlink else []), "--stream"],
                                    stdout=handle, stderr=subprocess.STDOUT)
    start = time.monotonic()
    try:
        while True:
            status, details = run_details(run_id, superlink)
            if status.startswith("finished"):
                return Launched(run_id, status, details, path)
            if timeout and time.monotonic() - start > timeout:
                raise ConfigError(f"run {run_id} still {status} after {timeout:g} s (it goes on: "
                                  f"flwr ls --run-id {run_id})")
            time.sleep(poll)
    finally:
        if follower is not None:
            time.sleep(min(poll, 2.0))  # let the log catch up with the end
            follower.terminate()
            try:
                follower.wait(timeout=10)
            except subprocess.TimeoutExpired:
                follower.kill()
        if handle is not None:
            handle.close()
