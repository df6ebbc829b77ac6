"""Data sources: one module per format, registered by name in :data:`SOURCES`.

A source is a function ``(spec: SourceSpec, options: Options) -> Dataset``. It reads the
files the spec names (``.gz`` transparently), validates them with errors that name the
file, line, column and value, and returns a canonical :class:`~fedrec.data.Dataset`.
Use :func:`fedrec.data.load_dataset` rather than calling sources directly: it parses the
spec, applies the options every format shares, and rejects unknown options.
"""

from __future__ import annotations

from typing import Callable

from fedrec.data.interactions import Dataset
from fedrec.data.spec import Options, SourceSpec
from fedrec.registry import Registry

__all__ = ["SOURCES", "Source"]

Source = Callable[[SourceSpec, Options], Dataset]

#: Registry of data-source formats (``FORMAT`` in ``FORMAT:PATH``).
SOURCES: Registry[Dataset] = Registry("data format")

# Import the modules so that they register themselves.
from fedrec.data.sources import (  # noqa: E402,F401
    atomic,
    cdr,
    kuaisar,
    movielens,
    pairs,
    recflow,
    seq,
    synthetic,
    tabular,
)
