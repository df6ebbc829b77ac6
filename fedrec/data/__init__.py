"""The data layer: sources, the canonical table, splits, batching, samplers, partitioning.

Start with :func:`load_dataset`::

    from fedrec.data import load_dataset
    ds = load_dataset("movielens:../shared/data/ml-100k/u.data")
    ds.interactions.frame.head()
"""

from __future__ import annotations

from fedrec.data.interactions import Dataset, Interactions
from fedrec.data.spec import SourceSpec, parse_spec

__all__ = ["Dataset", "Interactions", "SourceSpec", "parse_spec", "load_dataset", "known_formats"]


def known_formats() -> list[str]:
    """Names of the registered data formats."""
    from fedrec.data.sources import SOURCES

    return SOURCES.names()


def load_dataset(spec: str) -> Dataset:
    """Load the dataset a spec string names (``FORMAT:PATH[?key=value&...]``).

    Options every format accepts:

    * ``min_user=K`` — keep only users with at least K interactions (applied after loading);
    * ``min_item=K`` — keep only items with at least K interactions (applied once, before
      ``min_user``);
    * ``ctr_negatives=K`` — implicit feedback cast as CTR: every interaction a click followed
      by K sampled non-clicks of the same user, time, domain and split
      (:func:`~fedrec.data.filters.add_sampled_negatives`; ``negatives_seed``, default 0).

    Raises :class:`~fedrec.errors.SpecError` for a malformed spec, an unknown format or an
    unknown option, and :class:`~fedrec.errors.DataError` for bad files or an empty result.
    """
    from fedrec.data.filters import filter_min_counts
    from fedrec.data.sources import SOURCES
    from fedrec.errors import ConfigError, SpecError

    parsed = parse_spec(spec)
    try:
        source = SOURCES.get(parsed.format)
    except ConfigError as exc:
        raise SpecError(f"data spec {spec!r}: {exc}") from None
    options = parsed.new_options()
    min_user = options.int("min_user", None, minimum=1)
    min_item = options.int("min_item", None, minimum=1)
    ctr_negatives = options.int("ctr_negatives", None, minimum=1)
    negatives_seed = options.int("negatives_seed", 0)
    dataset = source(parsed, options)
    if min_user or min_item:
        dataset = filter_min_counts(dataset, min_user=min_user or 1, min_item=min_item or 1)
    if ctr_negatives:
        from fedrec.data.filters import add_sampled_negatives

        dataset = add_sampled_negatives(dataset, ctr_negatives, seed=negatives_seed)
    return dataset
