"""Checkpoints of a federated run, so that a run killed mid-way resumes where it stopped.

Every ``checkpoint-every`` rounds, at the end of the round:

* the **server** writes ``server.pt`` in ``checkpoint-dir``: the round, the global
  parameters, the per-layer group counts and the run history (best round, patience);
* each **client** writes ``client-<shard>-round<r>.pt``: its private state (per-user
  parameters and the DP accountant's history), during its ``train`` of that round.

Random draws need no saved state: participation, dropout masks, negatives and (with
``dp-noise-seed``) the DP noise are functions of (seed, round, shard). With a secret DP noise
seed the resumed rounds draw other noise, as they must. Files are written atomically
(temporary file + rename), so a kill during a write leaves the previous checkpoint intact.
``resume = true`` starts from ``server.pt`` and the clients' files of the same round.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from fedrec.errors import ConfigError

__all__ = ["load_client", "load_server", "save_client", "save_server"]

SERVER_FILE = "server.pt"


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_server(folder: str | Path, *, round: int, global_params: dict[str, torch.Tensor],
                group_counts: torch.Tensor, history: dict[str, Any]) -> Path:
    """Write the server's state at the end of ``round``."""
    path = Path(folder) / SERVER_FILE
    _atomic_save({"round": int(round), "global": {k: v.detach().clone() for k, v in global_params.items()},
                  "group_counts": group_counts.clone(), "history": history}, path)
    return path


def load_server(folder: str | Path) -> dict[str, Any]:
    """The server checkpoint in ``folder`` (a clear error when there is none)."""
    path = Path(folder) / SERVER_FILE
    if not path.is_file():
        raise ConfigError(f"resume: no server checkpoint {path}")
    return torch.load(path, weights_only=False)


def _client_path(folder: str | Path, shard: int, round: int) -> Path:
    return Path(folder) / f"client-{shard}-round{round}.pt"


def save_client(folder: str | Path, *, shard: int, round: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write a client's private state after its training in ``round``; keep the last
    ``keep`` rounds' files of this shard (the server's checkpoint may lag one round)."""
    path = _client_path(folder, shard, round)
    _atomic_save(state, path)
    mine = sorted(Path(folder).glob(f"client-{shard}-round*.pt"), key=lambda p: int(p.stem.rsplit("round", 1)[1]))
    for old in mine[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_client(folder: str | Path, *, shard: int, round: int) -> dict[str, Any]:
    """A client's private state saved after ``round`` (a clear error when missing)."""
    path = _client_path(folder, shard, round)
    if not path.is_file():
        raise ConfigError(f"resume: no checkpoint of shard {shard} at round {round} ({path})")
    return torch.load(path, weights_only=False)
