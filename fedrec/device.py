"""Where models and batches compute: ``--device auto|cpu|cuda|cuda:N|mps``.

:func:`resolve_device` turns the user's spelling into a :class:`torch.device` (``auto``
picks the first CUDA GPU, else Apple's MPS, else the CPU) and refuses, in one line, a
device this machine does not have. :func:`to_device` moves a batch (a dict of tensors and
other values) to it. Everything that leaves the model for numpy (metrics, results,
checkpoints) is brought back to the CPU by the caller, so result files and checkpoints are
the same whichever device trained them and load on a machine without a GPU.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from fedrec.errors import ConfigError

#: the spellings ``--device`` accepts
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device_spec(spec: str) -> str:
    """``spec`` if it is one of the spellings ``--device`` accepts (not whether this machine
    has it: a server checks a run config for nodes that may have a GPU it lacks)."""
    text = str(spec).strip().lower()
    if not _PATTERN.match(text):
        raise ConfigError(f"device must be {DEVICE_CHOICES} (got {spec!r})")
    return text


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The :class:`torch.device` that ``spec`` names (see the module docstring).

    ``None`` and ``"auto"`` pick a GPU when one is present. A device that is not present
    (``cuda`` without a CUDA build or GPU, ``cuda:3`` on a two-GPU machine, ``mps`` off
    Apple silicon) is a :class:`~fedrec.errors.ConfigError` naming it and what exists."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = "auto" if spec is None else check_device_spec(spec)
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise ConfigError(f"device 'mps' is not available here (available: {available_devices()})")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {text!r} is not available: this torch build sees no CUDA GPU "
                          f"(available: {available_devices()})")
    index = int(text.split(":")[1]) if ":" in text else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {text!r} is not available: this machine has {torch.cuda.device_count()} "
                          f"CUDA GPU(s) (available: {available_devices()})")
    return torch.device("cuda", index)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> str:
    """The devices of this machine, comma-separated (``cpu`` always)."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        names.append("mps")
    return ", ".join(names)


def place(model, device: torch.device):
    """``model.to(device)``; a model whose tensors the device cannot hold (float64 counts and
    rates on Apple's MPS, which has no float64) is a one-line
    :class:`~fedrec.errors.ConfigError` naming the model and the device."""
    try:
        return model.to(device)
    except (TypeError, RuntimeError) as exc:
        if "float64" in str(exc) or "Double" in str(exc):
            raise ConfigError(f"model {type(model).__name__} keeps float64 tensors, which device {device} cannot hold "
                              "(use --device cpu)") from exc
        raise


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``batch`` with every tensor value (also inside nested dicts, e.g. ``item_maps``) on
    ``device``; other values unchanged. A no-op (the same dict) on the CPU."""
    if device.type == "cpu":
        return batch
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            out[key] = value.to(device, non_blocking=True)
        elif isinstance(value, dict):
            out[key] = to_device(value, device)
        else:
            out[key] = value
    return out


def to_cpu(tree: Any) -> Any:
    """``tree`` (a tensor, or dicts / lists / tuples of them) with every tensor on the CPU:
    what is saved or turned into numpy."""
    if torch.is_tensor(tree):
        return tree.detach().cpu() if tree.device.type != "cpu" else tree
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return tree


def device_rng_state(device: torch.device) -> Any:
    """The random state of ``device``'s generator (None on the CPU, whose state
    ``torch.get_rng_state`` already holds)."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return None


def set_device_rng_state(device: torch.device, state: Any) -> None:
    """Restore :func:`device_rng_state` (nothing when ``state`` is None)."""
    if state is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state.cpu() if torch.is_tensor(state) else state, device)
