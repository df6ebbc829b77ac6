"""``cdr:DIR`` — the DisenCDR / CDRIB / UniCDR two-domain layout.

Used by DisenCDR (Cao et al., SIGIR 2022), CDRIB (Cao et al., ICDE 2022) and UniCDR (Cao et
al., WSDM 2023). ``DIR`` holds one folder per direction, e.g. ``sport_cloth/`` (the Sport
domain) and ``cloth_sport/`` (the Cloth domain), each with ``train.txt``, optionally
``valid.txt``, and ``test.txt``: tab-separated ``user item [...]`` lines with 0-based ids.

The result has a ``domain`` column (the first name of the folder: ``sport``, ``cloth``) and
the files' own ``split``. Items are per-domain (item 5 of Sport is not item 5 of Cloth), so
the k-th domain's raw item ids are offset by ``k * item_stride`` (stride = 1 + the largest
raw item id) to keep item ids unique across domains.
Users: ids below ``shared_users`` are the same person in every domain; ids at or above it
are single-domain users and become distinct users per domain (raw id + (k+1) * stride for
the k-th domain, stride = 1 + the largest raw id). ``shared_users=all`` (the default) means
every id is shared, as in DisenCDR's fully overlapping Sport–Cloth; CDRIB's Game–Video needs
``shared_users=2179`` (its SOURCE notes: ids 0..2178 are the common users).

Options: ``shared_users`` (``all`` or an integer), ``test`` (``test`` or
``test_original``: which file is the test split; DisenCDR's ``test.txt`` keeps only users
whose held-out item occurs in training), ``valid`` (``file``: ``valid.txt``, required when
present; ``test``: reuse the test file as validation, as UniCDR's code does for dual-user-intra,
i.e. model selection on the test set: only to reproduce it; ``holdout``: each (user, domain)
with at least two training rows gives its last training row in file order to validation;
``auto``, the default: ``valid.txt`` when the folder has one, else ``holdout``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedrec.data.interactions import Dataset, Interactions
from fedrec.data.io import find_in_dir, int_column, read_table, require_dir
from fedrec.data.sources import SOURCES
from fedrec.data.spec import Options, SourceSpec
from fedrec.errors import DataError, SpecError


def _domain_folders(directory: Path) -> list[Path]:
    folders = sorted(p for p in directory.iterdir() if p.is_dir() and find_in_dir(p, ["train.txt"], required=False))
    if len(folders) < 2:
        raise DataError(
            "expected at least two domain folders holding train.txt (e.g. sport_cloth/ and cloth_sport/)",
            file=directory,
        )
    # The folder whose name ends the directory's name comes first (DisenCDR-sport_cloth ->
    # sport_cloth is domain 0); otherwise alphabetical.
    first = [p for p in folders if directory.name.endswith(p.name)]
    return first + [p for p in folders if p not in first]


def _read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    frame, lines = read_table(path, sep="\t", header=False, dtype=str)
    if frame.shape[1] < 2:
        raise DataError("expected tab-separated 'user<TAB>item' lines", file=path, row=int(lines[0]))
    frame = frame.iloc[:, :2]
    frame.columns = ["user", "item"]
    users = int_column(frame, "user", lines, path)
    items = int_column(frame, "item", lines, path)
    for name, arr in (("user", users), ("item", items)):
        if (arr < 0).any():
            i = int(np.flatnonzero(arr < 0)[0])
            raise DataError("ids must be >= 0", file=path, row=int(lines[i]), column=name, value=int(arr[i]))
    return users, items


@SOURCES.register("cdr")
def load_cdr(spec: SourceSpec, options: Options) -> Dataset:
    """Load a multi-domain CDR directory (options: ``shared_users``, ``test``, ``valid``)."""
    directory = require_dir(spec.path)
    shared_raw = options.str("shared_users", "all")
    test_name = options.choice("test", ("test", "test_original"), "test")
    valid_mode = options.choice("valid", ("auto", "file", "test", "holdout"), "auto")
    options.finish()
    if shared_raw == "all":
        shared: int | None = None
    else:
        try:
            shared = int(shared_raw)
        except ValueError:
            raise SpecError(f"{spec.text}: option 'shared_users' must be 'all' or an integer (got {shared_raw!r})") from None
        if shared < 0:
            raise SpecError(f"{spec.text}: option 'shared_users' must be >= 0 (got {shared})")

    parts = []
    for folder in _domain_folders(directory):
        domain = folder.name.split("_")[0]
        files = [("train", find_in_dir(folder, ["train.txt"]))]
        valid = find_in_dir(folder, ["valid.txt"], required=False)
        test = find_in_dir(folder, [f"{test_name}.txt"])
        if valid_mode == "file" and valid is None:
            raise DataError("option valid=file: no valid.txt (use valid=holdout or valid=auto)", file=folder)
        holdout = valid_mode == "holdout" or (valid_mode == "auto" and valid is None)
        if valid_mode in ("file", "auto") and valid is not None:
            files.append(("valid", valid))
        elif valid_mode == "test":
            files.append(("valid", test))
        files.append(("test", test))
        for split, path in files:
            users, items = _read_pairs(path)
            frame = pd.DataFrame({"user": users, "item": items, "domain": domain, "split": split})
            if split == "train" and holdout:
                # the last training row (file order) of every user with at least two becomes validation
                last = ~frame.duplicated("user", keep="last").to_numpy()
                several = frame.groupby("user")["user"].transform("size").to_numpy() >= 2
                frame.loc[last & several, "split"] = "valid"
                # validation rows go after the training rows (time follows the file order)
                frame = pd.concat([frame[frame["split"] == "train"], frame[frame["split"] == "valid"]],
                                  ignore_index=True)
            parts.append(frame)
    table = pd.concat(parts, ignore_index=True)
    names = list(pd.unique(table["domain"]))
    if len(names) != len(set(names)) or len(names) < 2:
        raise DataError("domain folders must have distinct first names (e.g. sport_cloth and cloth_sport)", file=directory)
    if shared is not None:
        stride = int(table["user"].max()) + 1
        k = pd.Index(names).get_indexer(table["domain"])
        local = table["user"].to_numpy() >= shared
        table.loc[local, "user"] = table["user"].to_numpy()[local] + (k[local] + 1) * stride
    # items are per-domain: give the k-th domain's items the offset k * item_stride
    item_stride = int(table["item"].max()) + 1
    k_all = pd.Index(names).get_indexer(table["domain"])
    table["item"] = table["item"].to_numpy() + k_all * item_stride
    # time: order within (domain, user) following the files' train -> valid -> test order
    table["time"] = table.groupby(["domain", "user"], sort=False).cumcount().to_numpy()
    table = table[["user", "item", "time", "domain", "split"]]
    return Dataset(
        name=spec.text,
        interactions=Interactions.from_frame(table, source=str(directory)),
        meta={"format": "cdr", "domains": names, "shared_users": shared_raw, "time_unit": "position"},
    )
