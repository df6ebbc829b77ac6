"""``seq:PATH`` — one user per line, ``user item item ...`` in time order.

The S3-Rec release format (Zhou et al., CIKM 2020: Beauty, Sports, Toys, Yelp, LastFM).
Items are implicit positives (no ``label`` column); ``time`` is the position in the line.
Separator: any whitespace. A user id appearing on two lines is an error.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedrec.data.interactions import Dataset, Interactions
from fedrec.data.io import iter_lines, resolve_file
from fedrec.data.sources import SOURCES
from fedrec.data.spec import Options, SourceSpec
from fedrec.errors import DataError


@SOURCES.register("seq")
def load_seq(spec: SourceSpec, options: Options) -> Dataset:
    """Load a one-user-per-line sequence file (no options)."""
    options.finish()
    path = resolve_file(spec.path)
    users: list[int] = []
    lengths: list[int] = []
    items: list[int] = []
    seen: dict[int, int] = {}
    for number, line in iter_lines(path):
        tokens = line.split()
        try:
            ids = [int(t) for t in tokens]
            if not all(_is_int(t) for t in tokens):
                raise ValueError
        except ValueError:
            j = next(j for j, t in enumerate(tokens) if not _is_int(t))
            column = "user" if j == 0 else f"item {j}"
            raise DataError("expected an integer id", file=path, row=number, column=column, value=tokens[j]) from None
        big = next((j for j, v in enumerate(ids) if not -(2**63) <= v < 2**63), None)
        if big is not None:
            column = "user" if big == 0 else f"item {big}"
            raise DataError("id outside the int64 range", file=path, row=number, column=column, value=tokens[big])
        if len(ids) < 2:
            raise DataError("line has a user id but no items", file=path, row=number, value=line)
        user = ids[0]
        if user in seen:
            raise DataError(f"user {user} already has a line (line {seen[user]})", file=path, row=number, column="user")
        seen[user] = number
        users.append(user)
        lengths.append(len(ids) - 1)
        items.extend(ids[1:])
    if not users:
        raise DataError("file has no data rows", file=path)
    lengths_arr = np.asarray(lengths)
    starts = np.repeat(np.cumsum(lengths_arr) - lengths_arr, lengths_arr)
    table = pd.DataFrame(
        {
            "user": np.repeat(np.asarray(users, dtype=np.int64), lengths_arr),
            "item": np.asarray(items, dtype=np.int64),
            "time": np.arange(len(items), dtype=np.int64) - starts,
        }
    )
    return Dataset(spec.text, Interactions.from_frame(table, source=str(path)), meta={"format": "seq", "time_unit": "position"})


def _is_int(token: str) -> bool:
    """ASCII digits with an optional sign (rejects ``1_0`` and non-ASCII digits)."""
    body = token[1:] if token[:1] in "+-" else token
    return body.isascii() and body.isdigit()
