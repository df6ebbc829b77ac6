"""Parsing of data source specs and the Options reader."""

from __future__ import annotations

import pytest

from fedrec.data.spec import parse_spec
from fedrec.errors import SpecError


def test_path_and_query():
    spec = parse_spec("csv:logs/a.csv?user=uid&item=iid&sep=%3B")
    assert (spec.format, spec.path) == ("csv", "logs/a.csv")
    assert spec.options == {"user": "uid", "item": "iid", "sep": ";"}


def test_format_is_case_insensitive_and_windows_like_paths_keep_their_colon():
    spec = parse_spec("SEQ:C:/data/Beauty.txt")
    assert (spec.format, spec.path) == ("seq", "C:/data/Beauty.txt")


def test_synthetic_takes_a_comma_list_and_no_path():
    spec = parse_spec("synthetic:users=10,groups=2")
    assert spec.path == "" and spec.options == {"users": "10", "groups": "2"}
    assert parse_spec("synthetic:").options == {}


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "empty data spec"),
        ("Beauty.txt", "has no format"),
        ("seq:", "needs a path"),
        ("seq:a.txt?min_user", "not of the form key=value"),
        ("seq:a.txt?=3", "empty key"),
        ("seq:a.txt?a=1&a=2", "given twice"),
        ("synthetic:users=1,users=2", "given twice"),
        ("synthetic:users=1?users=2", "given twice"),
        ("se q:a", "is not a name"),
    ],
)
def test_malformed_specs(text, needle):
    with pytest.raises(SpecError, match=needle):
        parse_spec(text)


def test_options_typed_getters_and_unknown_keys():
    opts = parse_spec("synthetic:users=5,ratio=0.5,flag=yes,bad=x").new_options()
    assert opts.int("users", 1) == 5
    assert opts.float("ratio", 0.0, maximum=1.0) == 0.5
    assert opts.bool("flag", False) is True
    assert opts.int("missing", 7) == 7
    with pytest.raises(SpecError, match="unknown option.*bad"):
        opts.finish()
    with pytest.raises(SpecError, match="'users' must be >= 10"):
        parse_spec("synthetic:users=5").new_options().int("users", minimum=10)
    with pytest.raises(SpecError, match="must be one of a, b"):
        parse_spec("synthetic:m=c").new_options().choice("m", ("a", "b"), "a")
    with pytest.raises(SpecError, match="must be a number"):
        parse_spec("synthetic:r=nan").new_options().float("r")
