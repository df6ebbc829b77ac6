"""Flat kebab-case options at the edge (TOML files, ``--set key=value``, Flower run config)
turned into typed dataclass configs — in exactly one place, here.

Rules: ``some-key`` and ``some_key`` name the same field; an unknown key is an error listing
the known ones; a value of the wrong type is an error; nothing is silently fixed up. Values
from the command line (``--set KEY=VALUE``) are read as TOML scalars, as in a TOML file
(:func:`parse_scalar`: ``2`` an int, ``0.5`` a float, ``true`` a bool, anything else a
string), so ``--set groups=2`` is recorded as the int 2 wherever options are recorded. A
field keeps its type either way: a string option given a number takes its text
(``windows=8`` is ``"8"``), a boolean one accepts 0 / 1 and yes / no / on / off.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

from fedrec.errors import ConfigError

__all__ = ["build_config", "load_toml", "parse_assignments", "parse_scalar", "canonical_options"]

T = TypeVar("T")
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _coerce(value: Any, kind: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin is typing.Union or (origin is not None and str(origin) == "types.UnionType"):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None:
            return None
        kind = args[0]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):  # --set flag=1 (a TOML int)
            return bool(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # no option means anything by inf or nan
                raise ConfigError(f"{where}: option '{key}' must be a finite number (got {value!r})")
            return number
    elif kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # a scalar for a string option: its text, as typed
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return str(value)
    else:
        return value
    raise ConfigError(f"{where}: option '{key}' must be of type {kind.__name__} (got {value!r})")


def build_config(cls: type[T], options: Mapping[str, Any] | None, *, where: str = "config", **fixed: Any) -> T:
    """Build dataclass ``cls`` from flat ``options`` (kebab- or snake-case keys).

    ``fixed`` are values set by the caller (e.g. the task), which options may not override.
    Raises :class:`ConfigError` on an unknown key or a wrong type.
    """
    hints = typing.get_type_hints(cls, globalns=vars(sys.modules[cls.__module__]))
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    for raw_key, value in (options or {}).items():
        key = str(raw_key).replace("-", "_")
        if key not in fields or key in fixed:
            known = ", ".join(sorted(f.replace("_", "-") for f in fields - set(fixed)))
            raise ConfigError(f"{where}: unknown option '{raw_key}' (known: {known})")
        values[key] = _coerce(value, hints[key], raw_key, where)
    values.update(fixed)
    try:
        return cls(**values)
    except TypeError as exc:  # pragma: no cover - defensive
        raise ConfigError(f"{where}: {exc}") from None


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file into a dict; a missing or malformed file is a :class:`ConfigError`."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    p = Path(path)
    try:
        with open(p, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a folder, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{p}: config file is not readable (permission denied)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text file (a TOML config file is UTF-8 text)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None


def parse_scalar(text: str) -> Any:
    """A command-line value as a TOML file would hold it: ``"2"`` -> 2, ``"1e-3"`` -> 0.001,
    ``"true"`` -> True, a quoted ``'"x"'`` -> ``"x"``; anything that is not a TOML int,
    float, bool or string (``abc``, ``007``, ``2024-01-01``, ``[1, 2]``) stays the text."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, KeyError):
        return text
    return value if isinstance(value, (bool, int, float, str)) else text


def canonical_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` with every string value read by :func:`parse_scalar`: the form in which
    ``{"groups": "2"}`` (recorded before values were typed) and ``{"groups": 2}`` are one
    configuration (for comparing a saved run with this one)."""
    return {str(k): parse_scalar(v) if isinstance(v, str) else v for k, v in (options or {}).items()}


def parse_assignments(items: list[str] | None, *, what: str = "--set") -> dict[str, Any]:
    """``["a=1", "b-c=x"]`` -> ``{"a": 1, "b-c": "x"}``: each value read as a TOML scalar
    (:func:`parse_scalar`); malformed items and a key given twice (``-`` and ``_`` alike)
    are errors naming ``what`` (the option they came from)."""
    out: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{what} expects KEY=VALUE (got {item!r})")
        key, value = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"{what} expects KEY=VALUE (got {item!r})")
        key = key.strip()
        same = key.replace("_", "-")
        if same in seen:
            raise ConfigError(f"{what} {key} is given twice ({seen[same]!r} and {item!r}): keep one")
        seen[same] = item
        out[key] = parse_scalar(value.strip())
    return out
