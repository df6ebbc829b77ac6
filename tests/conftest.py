"""Shared fixtures: where the real datasets are (``../shared/data`` beside the project)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
