"""Checkpoints of a federated run, so that a run killed mid-way resumes where it stopped.

Every ``checkpoint-every`` rounds, at the end of the round:

* the **server** writes ``server.pt`` in ``checkpoint-dir``: the round, the global
  parameters, the per-layer group counts and the run history (best round, patience);
* each **client** writes ``client-<shard>-round<r>.pt``: its private state (per-user
  parameters and the DP accountant's history), during its ``train`` of that round.

Random draws need no saved state: participation, dropout masks, negatives and (with
``dp-noise-seed``) the DP noise are functions of (seed, round, shard). With a secret DP noise
seed the resumed rounds draw other noise, as they must. Files are written atomically
(temporary file + rename, :mod:`fedrec.files`), so a kill during a write leaves the previous
checkpoint intact; the server's files get the mode ``open`` would give, each client's (its
users' private parameters) is readable by its owner only (:data:`PRIVATE_MODE`, 0600).
``resume = true`` starts from ``server.pt`` and the clients' files of the same round. A node
that restarts in the middle of a run (a new process, an empty ``context.state``) takes its
latest file before the round it is asked to train (:func:`latest_client`).

**The model of a run** (``model-dir``): the server writes ``global.pt`` (the global
parameters and group counts of the best validation round, the run config, the layout and
the round's metrics) and each client writes ``client-<k>.pt`` (its private state of that
round, its node config and what it trained on) on its own machine; ``fedrec evaluate`` and
``fedrec recommend`` read them (:func:`load_model_dir`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedrec.errors import ConfigError
from fedrec.files import atomic_path

__all__ = ["load_client", "load_server", "save_client", "save_server", "latest_client", "save_client_model",
           "save_global_model", "load_model_dir", "GLOBAL_FILE"]

SERVER_FILE = "server.pt"
GLOBAL_FILE = "global.pt"


#: a client's files hold its users' private parameters: readable by their owner only
PRIVATE_MODE = 0o600


def _atomic_save(obj: Any, path: Path, *, mode: int | None = None) -> None:
    """``torch.save`` to ``path`` atomically, with the mode ``open`` would give (the
    server's files) or ``mode`` (a client's private state: :data:`PRIVATE_MODE`)."""
    with atomic_path(path, mode=mode) as tmp:
        torch.save(obj, tmp)


def save_server(folder: str | Path, *, round: int, global_params: dict[str, torch.Tensor],
                group_counts: torch.Tensor, history: dict[str, Any]) -> Path:
    """Write the server's state at the end of ``round``."""
    path = Path(folder) / SERVER_FILE
    _atomic_save({"round": int(round), "global": {k: v.detach().clone() for k, v in global_params.items()},
                  "group_counts": group_counts.clone(), "history": history}, path)
    return path


def _load(path: Path, what: str) -> Any:
    """``torch.load`` of a checkpoint file; an empty, truncated or foreign file is a one-line
    :class:`ConfigError` naming it (not an unpickling traceback, nor a bare "Aborted.")."""
    if path.stat().st_size == 0:
        raise ConfigError(f"{path}: empty {what} file (a run killed while writing it? remove it to start afresh)")
    try:
        return torch.load(path, weights_only=False, map_location="cpu")
    except Exception as exc:  # any unreadable file gets the same message
        raise ConfigError(f"{path}: not a readable {what} file ({type(exc).__name__}: truncated or not written by "
                          "fedrec)") from exc


def load_server(folder: str | Path) -> dict[str, Any]:
    """The server checkpoint in ``folder`` (a clear error when there is none)."""
    path = Path(folder) / SERVER_FILE
    if not path.is_file():
        raise ConfigError(f"resume: no server checkpoint {path}")
    state = _load(path, "server checkpoint")
    if not isinstance(state, dict) or not {"round", "global", "group_counts", "history"} <= set(state):
        raise ConfigError(f"{path}: not a fedrec server checkpoint")
    return state


def _client_path(folder: str | Path, shard: int, round: int) -> Path:
    return Path(folder) / f"client-{shard}-round{round}.pt"


def save_client(folder: str | Path, *, shard: int, round: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write a client's private state after its training in ``round``; keep the last
    ``keep`` rounds' files of this shard (the server's checkpoint may lag one round)."""
    path = _client_path(folder, shard, round)
    _atomic_save(state, path, mode=PRIVATE_MODE)
    mine = sorted(Path(folder).glob(f"client-{shard}-round*.pt"), key=lambda p: int(p.stem.rsplit("round", 1)[1]))
    for old in mine[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_client(folder: str | Path, *, shard: int, round: int) -> dict[str, Any]:
    """A client's private state saved after ``round`` (a clear error when missing)."""
    path = _client_path(folder, shard, round)
    if not path.is_file():
        raise ConfigError(f"resume: no checkpoint of shard {shard} at round {round} ({path})")
    return _load(path, "client checkpoint")


def latest_client(folder: str | Path, *, shard: int, before: int) -> tuple[int, dict[str, Any]] | None:
    """``(round, state)`` of shard ``shard``'s latest checkpoint saved before round
    ``before``, or None when it has none."""
    rounds = []
    for p in Path(folder).glob(f"client-{shard}-round*.pt"):
        try:
            r = int(p.stem.rsplit("round", 1)[1])
        except ValueError:
            continue
        if r < before:
            rounds.append(r)
    if not rounds:
        return None
    r = max(rounds)
    return r, _load(_client_path(folder, shard, r), "client checkpoint")


def save_client_model(folder: str | Path, *, client: int, round: int, state: dict[str, Any],
                      node_config: dict[str, Any], run_config: dict[str, Any], info: dict[str, Any]) -> Path:
    """Write client ``client``'s part of the run's model: its private state of ``round``."""
    path = Path(folder) / f"client-{client}.pt"
    _atomic_save({"kind": "fedrec-client-model", "client": int(client), "round": int(round), "state": state,
                  "node_config": node_config, "run_config": run_config, "info": info}, path, mode=PRIVATE_MODE)
    return path


def save_global_model(folder: str | Path, *, round: int, global_params: dict[str, torch.Tensor],
                      group_counts: torch.Tensor, run_config: dict[str, Any], layout: dict[str, Any],
                      metrics: dict[str, Any]) -> Path:
    """Write the server's part of the run's model: the global parameters of ``round``."""
    path = Path(folder) / GLOBAL_FILE
    _atomic_save({"kind": "fedrec-global-model", "round": int(round),
                  "global": {k: v.detach().clone() for k, v in global_params.items()},
                  "group_counts": group_counts.clone(), "run_config": run_config, "layout": layout,
                  "metrics": metrics}, path)
    return path


def load_model_dir(folder: str | Path, *, clients: list[str | Path] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(global, client models)`` of a federated model folder: ``global.pt`` and the given
    client files (default: every ``client-<k>.pt`` in the folder), each checked to belong to
    the global model's round."""
    folder = Path(folder)
    path = folder / GLOBAL_FILE
    if not path.is_file():
        raise ConfigError(f"{folder}: not a federated model folder (no {GLOBAL_FILE}; a run writes it with "
                          "--set model-dir=DIR)")
    glob = _load(path, "global model")
    if not isinstance(glob, dict) or glob.get("kind") != "fedrec-global-model":
        raise ConfigError(f"{path}: not a fedrec global model")
    files = [Path(c) for c in clients] if clients else sorted(folder.glob("client-*.pt"),
                                                             key=lambda p: int(p.stem.split("-")[1]))
    if not files:
        raise ConfigError(f"{folder}: no client-<k>.pt here (a client's private state lives on its own machine: "
                          "pass it with --client FILE)")
    out = []
    for f in files:
        if not f.is_file():
            raise ConfigError(f"{f}: client model file not found")
        c = _load(f, "client model")
        if not isinstance(c, dict) or c.get("kind") != "fedrec-client-model":
            raise ConfigError(f"{f}: not a fedrec client model")
        if int(c["round"]) != int(glob["round"]):
            raise ConfigError(f"{f}: saved at round {c['round']}, but the global model is round {glob['round']} "
                              "(files of different runs or rounds)")
        c["path"] = str(f)
        out.append(c)
    return glob, out
