"""Start a run of the fedrec Flower app on a SuperLink and exit by how the run ended.

``flwr run --stream`` exits 0 even when the ServerApp failed (the run's status is then
``finished:failed``). :func:`launch` submits the run (``flwr run APP SUPERLINK --format
json``: it returns the run id at once), streams its log (``flwr log RUN_ID``), polls ``flwr
ls --run-id RUN_ID --format json`` until the status is ``finished:*``, and returns that
status: ``fedrec launch`` exits 0 only on ``finished:completed``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fedrec.errors import ConfigError, FedrecError

__all__ = ["launch", "run_status"]


def _flwr() -> str:
    here = Path(sys.executable).with_name("flwr")
    return str(here) if here.exists() else (shutil.which("flwr") or "flwr")


def _json(done: subprocess.CompletedProcess, what: str) -> dict:
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        tail = (done.stderr or done.stdout).strip().splitlines()
        raise FedrecError(f"{what} failed: {tail[-1] if tail else 'no output'}") from None


def run_status(run_id: int, superlink: str | None = None) -> str:
    """The status of run ``run_id`` on ``superlink`` (a connection of ``$FLWR_HOME/config.toml``)."""
    args = [_flwr(), "ls", *([superlink] if superlink else []), "--run-id", str(run_id), "--format", "json"]
    out = _json(subprocess.run(args, capture_output=True, text=True, check=False, timeout=120), "flwr ls")
    runs = out.get("runs") or []
    if not runs:
        raise FedrecError(f"flwr ls: no run {run_id} on {superlink or 'the default SuperLink'}")
    return str(runs[0].get("status", "unknown"))


def launch(app: str | Path, superlink: str | None = None, *, run_config: str = "", federation_config: str = "",
           timeout: float = 0.0, stream: bool = True, poll: float = 2.0) -> tuple[int, str]:
    """Submit a run of ``app`` to ``superlink``, follow it to its end; ``(run id, final
    status)``. ``timeout`` > 0 stops following (the run goes on) after that many seconds."""
    args = [_flwr(), "run", str(app), *([superlink] if superlink else []), "--format", "json"]
    if run_config:
        args += ["--run-config", run_config]
    if federation_config:
        args += ["--federation-config", federation_config]
    submitted = _json(subprocess.run(args, capture_output=True, text=True, check=False), "flwr run")
    if not submitted.get("success") or not submitted.get("run-id"):
        raise FedrecError(f"flwr run: the SuperLink did not start the run ({submitted.get('error', submitted)})")
    run_id = int(submitted["run-id"])
    log = None
    if stream:
        log = subprocess.Popen([_flwr(), "log", str(run_id), *([superlink] if superlink else []), "--stream"],
                               stdout=sys.stderr, stderr=subprocess.STDOUT)
    start = time.monotonic()
    try:
        while True:
            status = run_status(run_id, superlink)
            if status.startswith("finished"):
                return run_id, status
            if timeout and time.monotonic() - start > timeout:
                raise ConfigError(f"run {run_id} still {status} after {timeout:g} s (it goes on: "
                                  f"flwr ls --run-id {run_id})")
            time.sleep(poll)
    finally:
        if log is not None:
            time.sleep(min(poll, 2.0))  # let the log catch up with the end
            log.terminate()
            try:
                log.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.kill()
