"""Experiment logs: every epoch / round of a long run, as it happens.

Three outputs, all from one :class:`RunLog`:

- ``LOG_DIR/metrics.jsonl``: one JSON object per epoch (``fedrec train``) or round
  (``fedrec simulate``), flushed as it is written, so ``tail -f`` and a crashed run keep
  what was done. Each line has ``step`` (the epoch or round), ``kind`` (``epoch`` or
  ``round``), ``time`` (seconds since the run started) and the record's numbers, nested keys
  joined by ``/`` (``valid/auc``, ``valid/ndcg@10``, ``loss``). ``LOG_DIR/run.json`` holds
  what the run is (command, model, data, options), written first.
- TensorBoard event files in ``LOG_DIR`` when the ``tensorboard`` package is installed
  (``pip install "fedrec[tensorboard]"``; ``tensorboard --logdir LOG_DIR``), one scalar per
  number, tagged as in the JSON lines. We chose TensorBoard over MLflow: it needs no server
  or tracking store, writes plain files a cluster job can leave behind, and is what PyTorch
  users already read; the JSON lines serve every other tool (pandas reads them with
  ``pd.read_json(path, lines=True)``).
- One :mod:`logging` line per record on the ``fedrec`` logger (``INFO``). The CLI shows
  these lines on stderr when stderr is not a terminal (under ``nohup``, in CI, piped to a
  file), where the progress bar would print nothing until the end; on a terminal the bar is
  shown instead. Library users configure the ``fedrec`` logger as they like.

A log directory that exists is appended to (a resumed run continues its log); one that
cannot be created or written is a one-line error before any work.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from fedrec.errors import ConfigError

#: the logger every epoch / round line goes to
LOGGER_NAME = "fedrec"
log = logging.getLogger(LOGGER_NAME)


def check_log_dir(path: str | Path) -> Path:
    """``path`` as a usable log directory: created if missing, and writable; anything else
    (a file, no permission) is a :class:`~fedrec.errors.ConfigError` naming it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--log-dir {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--log-dir {path}: cannot be created ({exc.strerror or type(exc).__name__})") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--log-dir {path}: is not writable")
    return path


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of ``record`` (nested dicts joined by ``/``; booleans, strings,
    lists and non-finite values left out)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                out[name] = float(value)
    return out


def _tensorboard_writer(path: Path):
    """A TensorBoard ``SummaryWriter`` for ``path``, or None when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the optional extra is not installed
        return None
    return SummaryWriter(log_dir=str(path))


class RunLog:
    """The log of one run (see the module docstring).

    Parameters
    ----------
    log_dir:
        Where ``metrics.jsonl``, ``run.json`` and the TensorBoard events go; ``None`` or
        ``""``: no files, only the :mod:`logging` lines.
    kind:
        ``"epoch"`` or ``"round"``: what one record is.
    run:
        What the run is (written to ``run.json``): e.g. command, model, data, options.
    tensorboard:
        Write TensorBoard events when the package is installed (default True).
    """

    def __init__(self, log_dir: str | Path | None, *, kind: str, run: dict[str, Any] | None = None,
                 tensorboard: bool = True) -> None:
        if kind not in ("epoch", "round"):
            raise ConfigError(f"log kind must be epoch or round (got {kind!r})")
        self.kind = kind
        self.start = time.perf_counter()
        self.dir = check_log_dir(log_dir) if log_dir else None
        self._jsonl = None
        self._tb = None
        self.tensorboard = False
        if self.dir is not None:
            if run is not None:
                (self.dir / "run.json").write_text(json.dumps(run, indent=2, sort_keys=True, default=str) + "\n")
            self._jsonl = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")
            if tensorboard:
                self._tb = _tensorboard_writer(self.dir)
                self.tensorboard = self._tb is not None

    def write(self, step: int, record: dict[str, Any], *, total: int | None = None) -> None:
        """Log ``record`` (the numbers of epoch / round ``step``; ``total``: how many the run
        may take, for the log line)."""
        numbers = {k: v for k, v in flatten(record).items() if k not in ("epoch", "round")}
        line = {"step": int(step), "kind": self.kind, "time": round(time.perf_counter() - self.start, 3), **numbers}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(line) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for name, value in numbers.items():
                self._tb.add_scalar(name, value, global_step=int(step))
            self._tb.flush()
        shown = " ".join(f"{k}={_short(v)}" for k, v in numbers.items() if _shown(k))
        of = f"/{total}" if total else ""
        log.info("%s %d%s %s", self.kind, step, of, shown)

    def close(self) -> None:
        """Close the files (idempotent)."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shown(key: str) -> bool:
    """Keys worth a place on the one log line: the loss, the main metrics, privacy spent."""
    last = key.rsplit("/", 1)[-1]
    return (last in ("loss", "epsilon", "auc", "logloss", "mrr", "gauc")
            or last in ("hr@10", "ndcg@10", "recall@10"))


def _short(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() and abs(value) >= 1 else f"{value:.4g}"


class _StderrLines(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a line is emitted (the CLI's
    stderr may be replaced, e.g. by a test runner), and only when it is not a terminal."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(asctime)s fedrec %(message)s", datefmt="%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr
        if getattr(stream, "isatty", lambda: False)():
            return  # a terminal shows the progress bar instead
        self.stream = stream
        super().emit(record)


def configure_cli_warnings() -> None:
    """Print every :class:`~fedrec.errors.FedrecWarning` as one line on stderr,
    ``fedrec: warning: MESSAGE``, once per message (other warnings keep Python's format).
    The CLI calls this; idempotent."""
    import warnings

    from fedrec.errors import FedrecWarning

    if getattr(warnings.showwarning, "_fedrec", False):
        return
    original = warnings.showwarning
    shown: set[str] = set()  # each node of an in-process run may raise the same warning

    def show(message, category, filename, lineno, file=None, line=None):
        if isinstance(category, type) and issubclass(category, FedrecWarning):
            if str(message) not in shown:
                shown.add(str(message))
                print(f"fedrec: warning: {message}", file=sys.stderr if file is None else file)
            return
        original(message, category, filename, lineno, file, line)

    show._fedrec = True  # type: ignore[attr-defined]
    warnings.showwarning = show
    warnings.filterwarnings("always", category=FedrecWarning)  # deduplicated above, by message


def configure_cli_logging() -> None:
    """Show the ``fedrec`` logger's INFO lines on stderr when stderr is not a terminal,
    unless the logger was configured already (the CLI calls this; a library user
    configures the logger themselves). On a terminal the progress bar is shown instead."""
    if log.handlers:
        return
    log.addHandler(_StderrLines())
    log.setLevel(logging.INFO)
    log.propagate = False
