"""Errors that fedrec raises on bad input.

Every error carries a one-line message that names what was wrong (file, row, column,
value, option) so that the CLI can print it as-is and exit non-zero, without a deep
traceback from pandas or torch.
"""

from __future__ import annotations

__all__ = ["FedrecError", "FedrecWarning", "DataError", "SpecError", "ConfigError"]


class FedrecWarning(UserWarning):
    """A warning fedrec gives about an accepted but doubtful input (e.g. a DP ``delta`` above
    1 / population); the CLI prints it as one line, ``fedrec: warning: ...``
    (:func:`fedrec.logs.configure_cli_warnings`)."""


class FedrecError(Exception):
    """Base class of every error fedrec reports to a user as one line.

    Line breaks in the message (e.g. from a percent-decoded option name) become spaces.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(" ".join(str(message).splitlines()))


class DataError(FedrecError):
    """A data file is missing, unreadable or does not hold what its format promises.

    Parameters
    ----------
    message:
        What is wrong, in words.
    file:
        The file (or directory) concerned, if any.
    row:
        1-based line number in ``file`` (header line included), if known.
    column:
        The column or field concerned, if any.
    value:
        The offending value, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        file: object | None = None,
        row: int | None = None,
        column: str | None = None,
        value: object | None = None,
    ) -> None:
        self.file = None if file is None else str(file)
        self.row = row
        self.column = column
        self.value = value
        where = []
        if self.file is not None:
            where.append(self.file)
        if row is not None:
            where.append(f"line {row}")
        if column is not None:
            where.append(f"column '{column}'")
        prefix = ", ".join(where)
        text = f"{prefix}: {message}" if prefix else message
        if value is not None:
            shown = repr(value)
            if len(shown) > 60:
                shown = shown[:57] + "..."
            text += f" (got {shown})"
        super().__init__(text)


class SpecError(FedrecError):
    """A data source spec string (``FORMAT:PATH?key=value``) is malformed or unknown."""


class ConfigError(FedrecError):
    """A configuration value is invalid (wrong type, out of range, unknown key)."""
