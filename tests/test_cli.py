"""The ``fedrec`` command line: help (train, simulate and compare name their per-dataset
defaults), version, ``data describe`` (JSON and table) and ``data formats``.

Every check runs the CLI as a user does, in a subprocess of this interpreter
(``python -m fedrec.cli ...``). Bad input to ``data describe`` is covered in
``tests/data/test_bad_input.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fedrec
from fedrec.data import known_formats

KEYS = {"users", "items", "interactions", "label_rate", "domains"}


def fedrec_cli(*args: str) -> subprocess.CompletedProcess:
    """Run ``fedrec ARGS`` and return the finished process (text output)."""
    env = {**os.environ, "COLUMNS": "200"}  # a wide console, so rich never wraps a table row
    return subprocess.run(
        [sys.executable, "-m", "fedrec.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


def describe_json(spec: str) -> dict:
    """``fedrec data describe SPEC --json``, checked to print exactly one JSON object."""
    result = fedrec_cli("data", "describe", spec, "--json")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1, result.stdout  # one line
    stats = json.loads(result.stdout)  # and nothing but the object on it
    assert isinstance(stats, dict)
    assert KEYS <= stats.keys()
    return stats


@pytest.mark.parametrize(
    "args, mentions",
    [
        ((), ["data"]),
        (("data",), ["describe", "formats"]),
        (("data", "describe"), ["describe", "SPEC", "--json"]),
        (("data", "formats"), ["formats"]),
        (("train",), ["Per-dataset defaults apply", "fedrec defaults SPEC", "resolved"]),
        (("simulate",), ["Per-dataset defaults apply", "fedrec defaults SPEC", "resolved"]),
        (("compare",), ["Per-dataset defaults apply", "fedrec defaults SPEC", "resolved"]),
        (("defaults",), ["SPEC", "--model", "--algorithm", "always win"]),
    ],
    ids=["fedrec", "data", "describe", "formats", "train", "simulate", "compare", "defaults"],
)
def test_help(args, mentions):
    result = fedrec_cli(*args, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    for word in mentions:
        assert word in result.stdout


def test_version():
    result = fedrec_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"fedrec {fedrec.__version__}\n"


def test_describe_json_single_domain():
    stats = describe_json("synthetic:users=50,seed=1")
    assert stats["users"] == 50
    assert stats["domains"] is None
    assert stats["items"] > 0 and stats["interactions"] >= 50 * 10  # min_len=10 impressions each
    assert 0.0 < stats["label_rate"] < 1.0


def test_describe_json_two_domains():
    stats = describe_json("synthetic:users=60,domains=2,seed=0")
    assert isinstance(stats["domains"], dict)
    assert len(stats["domains"]) == 2
    for part in stats["domains"].values():
        assert part["users"] > 0 and part["interactions"] > 0
    assert sum(d["interactions"] for d in stats["domains"].values()) == stats["interactions"]


def test_describe_json_implicit_feedback_has_null_label_rate(tmp_path: Path):
    path = tmp_path / "seq.txt"
    path.write_text("1 10 11 12\n2 11 13\n3 10\n")
    stats = describe_json(f"seq:{path}")
    assert stats["label_rate"] is None
    assert (stats["users"], stats["items"], stats["interactions"]) == (3, 4, 6)


def test_describe_table_shows_user_count():
    result = fedrec_cli("data", "describe", "synthetic:users=1234,items=100,max_len=12,seed=0")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert re.search(r"\busers\b\W+1,234\b", result.stdout), result.stdout


def test_data_formats_lists_every_format():
    result = fedrec_cli("data", "formats")
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    assert listed == known_formats()
