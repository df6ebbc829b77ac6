"""``pairs:PATH`` — one ``user item`` pair per line, time-ordered within each user.

The SASRec release format (Kang & McAuley, ICDM 2018: ``Beauty.txt``, ``Video.txt``,
``Steam.txt``). Items are implicit positives; ``time`` is the pair's position among the
user's lines, so lines of one user may be interleaved with others'.
"""

from __future__ import annotations

import pandas as pd

from fedrec.data.interactions import Dataset, Interactions
from fedrec.data.io import int_column, read_table, resolve_file
from fedrec.data.sources import SOURCES
from fedrec.data.spec import Options, SourceSpec


@SOURCES.register("pairs")
def load_pairs(spec: SourceSpec, options: Options) -> Dataset:
    """Load a ``user item`` pairs file (option ``sep``: the separator, default whitespace)."""
    sep = options.str("sep", r"\s+")
    options.finish()
    path = resolve_file(spec.path)
    frame, lines = read_table(path, sep=sep, header=False, names=["user", "item"], dtype=str)
    users = int_column(frame, "user", lines, path)
    table = pd.DataFrame(
        {
            "user": users,
            "item": int_column(frame, "item", lines, path),
            "time": pd.Series(users).groupby(users).cumcount().to_numpy(),
        }
    )
    return Dataset(spec.text, Interactions.from_frame(table, source=str(path)), meta={"format": "pairs", "time_unit": "position"})
