"""The per-dataset defaults of a federated run, kept for the importers of this module: they
live in :mod:`fedrec.defaults` (one set for ``fedrec train``, ``simulate`` and ``compare``)."""

from __future__ import annotations

from fedrec.defaults import defaults_for

__all__ = ["defaults_for"]
