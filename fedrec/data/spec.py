"""Data source specs: ``FORMAT:PATH[?key=value&...]``.

Examples::

    kuaisar:../shared/data/KuaiSAR-R
    movielens:../shared/data/ml-100k/u.data?threshold=4
    csv:logs.csv?user=uid&item=iid&time=ts&label=click
    synthetic:users=2000,groups=4,seed=0

``synthetic`` takes no path: its body is a comma-separated ``key=value`` list (the
``?key=value&...`` form is accepted too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote

from fedrec.errors import SpecError

__all__ = ["SourceSpec", "Options", "parse_spec"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass
class Options:
    """The ``key=value`` options of a spec, read with typed getters.

    Every getter marks its key as used; :meth:`finish` then rejects any key nobody read,
    so a misspelt option is an error rather than silently ignored.
    """

    values: dict[str, str] = field(default_factory=dict)
    spec: str = ""
    _used: set[str] = field(default_factory=set)

    def _raw(self, key: str) -> str | None:
        self._used.add(key)
        return self.values.get(key)

    def has(self, key: str) -> bool:
        """Whether ``key`` was given (marks it as used)."""
        return self._raw(key) is not None

    def str(self, key: str, default: str | None = None) -> str | None:
        """Option ``key`` as a string, or ``default``."""
        raw = self._raw(key)
        return default if raw is None else raw

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        """Option ``key`` restricted to ``choices``."""
        raw = self._raw(key)
        if raw is None:
            return default
        if raw not in choices:
            raise SpecError(
                f"{self.spec}: option '{key}' must be one of {', '.join(choices)} (got {raw!r})"
            )
        return raw

    def int(self, key: str, default: int | None = None, *, minimum: int | None = None) -> int | None:
        """Option ``key`` as an integer (>= ``minimum`` when given), or ``default``."""
        raw = self._raw(key)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SpecError(f"{self.spec}: option '{key}' must be an integer (got {raw!r})") from None
        if minimum is not None and value < minimum:
            raise SpecError(f"{self.spec}: option '{key}' must be >= {minimum} (got {value})")
        return value

    def float(
        self,
        key: str,
        default: float | None = None,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> float | None:
        """Option ``key`` as a float within [``minimum``, ``maximum``], or ``default``."""
        raw = self._raw(key)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise SpecError(f"{self.spec}: option '{key}' must be a number (got {raw!r})") from None
        if value != value:  # NaN
            raise SpecError(f"{self.spec}: option '{key}' must be a number (got {raw!r})")
        if minimum is not None and value < minimum:
            raise SpecError(f"{self.spec}: option '{key}' must be >= {minimum} (got {raw})")
        if maximum is not None and value > maximum:
            raise SpecError(f"{self.spec}: option '{key}' must be <= {maximum} (got {raw})")
        return value

    def bool(self, key: str, default: bool) -> bool:
        """Option ``key`` as a boolean (true/false, yes/no, 1/0, on/off)."""
        raw = self._raw(key)
        if raw is None:
            return default
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise SpecError(f"{self.spec}: option '{key}' must be true or false (got {raw!r})")

    def finish(self, allowed_extra: tuple[str, ...] = ()) -> None:
        """Raise :class:`SpecError` for any option that no getter read."""
        unknown = sorted(set(self.values) - self._used - set(allowed_extra))
        if unknown:
            known = ", ".join(sorted(self._used | set(allowed_extra))) or "none"
            raise SpecError(
                f"{self.spec}: unknown option(s) {', '.join(unknown)} (this format takes: {known})"
            )


@dataclass(frozen=True)
class SourceSpec:
    """A parsed spec: the format name, the path (may be empty) and the options."""

    format: str
    path: str
    options: dict[str, str]
    text: str

    def new_options(self) -> Options:
        """A fresh :class:`Options` reader over this spec's options."""
        return Options(values=dict(self.options), spec=self.text)


def _parse_pairs(text: str, sep: str, spec: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for part in text.split(sep):
        if not part:
            continue
        if "=" not in part:
            raise SpecError(f"{spec}: option {part!r} is not of the form key=value")
        key, value = part.split("=", 1)
        key = unquote(key.strip())
        if not key:
            raise SpecError(f"{spec}: option {part!r} has an empty key")
        if key in options:
            raise SpecError(f"{spec}: option '{key}' is given twice")
        options[key] = unquote(value.strip())
    return options


def parse_spec(text: str, *, pathless: frozenset[str] = frozenset({"synthetic"})) -> SourceSpec:
    """Parse ``FORMAT:PATH[?key=value&...]`` into a :class:`SourceSpec`.

    Formats in ``pathless`` take a comma-separated ``key=value`` body instead of a path.
    Raises :class:`SpecError` with a one-line message on a malformed spec.
    """
    if not isinstance(text, str) or not text.strip():
        raise SpecError("empty data spec: expected FORMAT:PATH, e.g. movielens:data/ml-100k/u.data")
    text = text.strip()
    if ":" not in text:
        raise SpecError(
            f"data spec {text!r} has no format: expected FORMAT:PATH, e.g. seq:data/Beauty.txt"
        )
    fmt, rest = text.split(":", 1)
    fmt = fmt.strip().lower()
    if not fmt or not fmt.replace("_", "").replace("-", "").isalnum():
        raise SpecError(f"data spec {text!r}: format {fmt!r} is not a name")
    path, _, query = rest.partition("?")
    if fmt in pathless:
        options = _parse_pairs(path, ",", text)
        for key, value in _parse_pairs(query, "&", text).items():
            if key in options:
                raise SpecError(f"{text}: option '{key}' is given twice")
            options[key] = value
        return SourceSpec(fmt, "", options, text)
    if not path.strip():
        raise SpecError(f"data spec {text!r}: format '{fmt}' needs a path after the colon")
    return SourceSpec(fmt, path.strip(), _parse_pairs(query, "&", text), text)
