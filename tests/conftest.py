"""Shared fixtures: where the real datasets are (``../shared/data`` beside the project)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEDREC_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder; skip when absent, but fail under CI where it must be present."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI run without the real data folder {SHARED_DATA}")
        pytest.skip(f"real data folder {SHARED_DATA} not present")
    return SHARED_DATA


def write_negatives(split, path: Path, n: int = 99, seed: int = 0) -> Path:
    """Write a negatives file (``user neg_1 ... neg_n``, raw ids) for every user of ``split``:
    ``n`` distinct items the user never interacted with, drawn with ``seed``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    seen = split.seen_pairs()
    lines = []
    for u in range(1, split.n_users + 1):
        mine = seen[(seen // (split.n_items + 1)) == u] % (split.n_items + 1)
        neg = rng.choice(np.setdiff1d(np.arange(1, split.n_items + 1), mine), n, replace=False)
        lines.append(" ".join([str(split.user_raw[u]), *(str(split.item_raw[i]) for i in neg)]))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def float64():
    """Run a test with float64 as torch's default dtype (equality tests against the
    one-user loop, where a fresh Adam's first step amplifies rounding)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def run_rounds(alg, shards, rounds: int, *, reference: bool = False):
    """``rounds`` federated rounds of ``alg`` over the given user shards (one client each),
    with the vectorised engine or the one-user-at-a-time loop: the final global parameters
    and the clients' states."""
    from fedrec.federated.reference import reference_client_update

    g = alg.initial_global()
    states = [alg.initial_local(s) for s in shards]
    made = [alg.make_shard(s) for s in shards]
    update = reference_client_update if reference else type(alg).client_update
    for r in range(1, rounds + 1):
        ups = [update(alg, g, st, sh, round=r)[0] for st, sh in zip(states, made, strict=True)]
        g, _, _ = alg.aggregate(g, ups)
    return g, states
