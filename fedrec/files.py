"""Atomic file writes that leave the permissions a plain ``open(path, "w")`` would.

Every result, table, plot, checkpoint or catalogue fedrec writes goes to a temporary file in
the target's folder and is renamed over the target only once complete: a crash or a kill
leaves the previous file whole (or none), never a truncated one. ``tempfile.mkstemp``
creates that temporary file with mode 0600, which would hide every result from the user's
group; here the finished file gets the mode ``open`` would have given it: an existing
file's own mode, else ``0666`` minus the process umask (0644 under the usual umask 022).
A caller may ask for another mode (a federated client's private state stays 0600).
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["umask", "new_file_mode", "atomic_path", "write_text_atomic", "write_json_atomic", "merge_json_entry",
           "dumps_entries",
           "check_writable"]


def check_writable(path: str | Path, what: str, *, folder: bool = False) -> Path:
    """Refuse, before any work, an output ``path`` that cannot be written: a file that is a
    folder (or, with ``folder``, a folder that is a file), an existing one without write
    permission, or one whose nearest existing parent is not a writable folder (missing
    folders are created when the output is written). ``what`` names the option in the
    one-line :class:`~fedrec.errors.ConfigError`. Nothing is created here."""
    from fedrec.errors import ConfigError

    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise ConfigError(f"{what} {path}: exists and is not a folder")
        if not folder and path.is_dir():
            raise ConfigError(f"{what} {path}: is a folder, not a file")
        if not os.access(path, os.W_OK) or (folder and not os.access(path, os.X_OK)):
            raise ConfigError(f"{what} {path}: is not writable")
        if not folder and not os.access(path.parent, os.W_OK | os.X_OK):
            raise ConfigError(f"{what} {path}: its folder {path.parent} is not writable (the file is replaced atomically)")
        return path
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{what} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: cannot be created ({parent} is not writable)")
    return path


def umask() -> int:
    """The process umask, read without changing it where the system tells it (Linux's
    ``/proc/self/status``; setting and restoring it would race with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode(path: str | Path | None = None) -> int:
    """The permission bits ``open(path, "w")`` would leave: those of the file already at
    ``path``, else ``0o666 & ~umask``."""
    if path is not None:
        try:
            return Path(path).stat().st_mode & 0o777
        except FileNotFoundError:
            pass
    return 0o666 & ~umask()


@contextmanager
def atomic_path(path: str | Path, *, suffix: str = ".tmp", mode: int | None = None) -> Iterator[Path]:
    """Write ``path`` atomically: yields a temporary path in the same folder (missing
    folders are created) for the caller to write; on success it gets ``mode`` (default
    :func:`new_file_mode` of ``path``) and replaces ``path``; on any error it is removed
    and ``path`` is left as it was. ``suffix`` ends the temporary name (e.g. ``.png``
    for writers that infer the format from it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, new_file_mode(path) if mode is None else mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str, *, mode: int | None = None) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`); returns ``path``."""
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(obj: Any, path: str | Path, *, indent: int | None = 1, mode: int | None = None) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`atomic_path`); returns ``path``."""
    return write_text_atomic(path, json.dumps(obj, indent=indent), mode=mode)


def dumps_entries(obj: dict[str, Any]) -> str:
    """A results object (one entry per run: ``row/seedK`` -> result) as JSON with one entry per
    line, each written compactly: a third of the size of ``indent=1`` for runs that carry
    per-epoch histories, and a rerun of one (row, seed) changes one line of the file."""
    if not obj:
        return "{}\n"
    return "{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in obj.items()) + "\n}\n"


def merge_json_entry(path: str | Path, key: str, value: Any) -> dict[str, Any]:
    """Set ``key`` to ``value`` in the JSON object at ``path`` (created when absent), under an
    exclusive lock on ``path.lock`` and written atomically, so several processes may fill one
    results file; returns the whole object as written."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.exists() else {}
        results[key] = value
        write_json_atomic(results, path)
    return results
