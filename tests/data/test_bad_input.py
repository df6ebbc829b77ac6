"""Bad input gives one clear line, never a traceback: ``load_dataset`` and ``fedrec data describe``.

Every case writes a tiny bad file (or spec) under ``tmp_path`` and checks that

* the library raises a :class:`~fedrec.errors.FedrecError` (``DataError`` or ``SpecError``)
  whose message is one line naming what is wrong (file, line, column, value: substrings);
* the CLI exits with code 2, prints nothing on stdout and exactly one
  ``fedrec: error: ...`` line on stderr, without a traceback.

"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from fedrec.data import known_formats, load_dataset
from fedrec.errors import DataError, FedrecError, SpecError

Expect = str | tuple[str, ...]  # a substring, or a tuple of alternatives (any one must occur)


@dataclass(frozen=True)
class Case:
    """A bad input: files to write (relative path -> text or bytes), a spec and the expected error."""

    id: str
    files: dict[str, str | bytes]
    spec: str  # "{tmp}" stands for the case's folder
    expect: tuple[Expect, ...]
    error: type[FedrecError] = DataError
    cli: bool = True  # also run through the CLI (a subprocess, ~1 s each)


def _case(id, files, spec, expect, error=DataError, cli=True):
    return pytest.param(Case(id, files, spec, tuple(expect), error, cli), id=id)


def _extra(*args, **kwargs):
    """A case checked through the library only: the CLI path it would take is covered by the others."""
    return _case(*args, cli=False, **kwargs)


SEQ = "1 2 3\n2 3 4\n3 4 5 6\n"
LOGS = "uid,iid,click\n1,2,1\n2,3,0\n"
UDATA = "1\t2\t5\t881250949\n2\t3\t3\t881250950\n"
DF_HEAD = "user_id,video_id,timestamp,is_click\n"
DF = DF_HEAD + "1,10,1000,1\n2,11,2000,0\n"
CDR_AB = {"c/a_b/train.txt": "0\t1\n1\t2\n", "c/a_b/test.txt": "0\t2\n"}
CDR_BA = {"c/b_a/train.txt": "0\t1\n1\t0\n", "c/b_a/test.txt": "1\t1\n"}

CASES = [
    # --- files and directories -----------------------------------------------------------------
    _case("missing_file", {}, "seq:{tmp}/missing.txt", ["missing.txt", "not found"]),
    _case("path_is_directory", {"adir/x.txt": SEQ}, "seq:{tmp}/adir", ["adir", "is a directory"]),
    _extra("dir_format_given_file", {"notadir.txt": SEQ}, "kuaisar:{tmp}/notadir.txt",
           ["notadir.txt", "expected a directory"]),
    _case("empty_file", {"empty.txt": ""}, "seq:{tmp}/empty.txt", ["empty.txt", ("empty", "no data")]),
    _case("blank_lines_only", {"blank.txt": "\n\n   \n\t\n"}, "seq:{tmp}/blank.txt",
          ["blank.txt", ("empty", "no data")]),
    _extra("csv_empty_file", {"logs.csv": ""}, "csv:{tmp}/logs.csv?user=uid&item=iid",
           ["logs.csv", ("empty", "no data")]),
    _extra("csv_header_only", {"logs.csv": "uid,iid\n"}, "csv:{tmp}/logs.csv?user=uid&item=iid",
           ["logs.csv", "no data"]),
    _case("gz_not_gzip", {"s.txt.gz": SEQ}, "seq:{tmp}/s.txt.gz", ["s.txt.gz", "gzip"]),
    _extra("gz_truncated", {"s.txt.gz": gzip.compress(SEQ.encode() * 40)[:25]}, "pairs:{tmp}/s.txt.gz",
           ["s.txt.gz", ("ended", "truncated", "cannot read")]),
    _extra("not_utf8", {"latin.txt": "1 2 3\n2 \xe9 4\n".encode("latin-1")}, "seq:{tmp}/latin.txt",
           ["latin.txt", "utf-8"]),
    # --- the spec string ------------------------------------------------------------------------
    _case("unknown_format", {"s.txt": SEQ}, "nope:{tmp}/s.txt", ["'nope'", "known", *known_formats()], SpecError),
    _case("spec_without_colon", {"s.txt": SEQ}, "{tmp}/s.txt", ["s.txt", "no format"], SpecError),
    _extra("spec_without_path", {}, "seq:", ["'seq'", "needs a path"], SpecError),
    _case("option_not_key_value", {"s.txt": SEQ}, "seq:{tmp}/s.txt?foo", ["'foo'", "key=value"], SpecError),
    _extra("option_given_twice", {"s.txt": SEQ}, "seq:{tmp}/s.txt?min_user=1&min_user=2",
           ["'min_user'", "twice"], SpecError),
    _case("unknown_option", {"u.data": UDATA}, "movielens:{tmp}/u.data?thresh=4",
          ["unknown option", "thresh", "threshold"], SpecError),
    _case("option_wrong_type", {"u.data": UDATA}, "movielens:{tmp}/u.data?threshold=abc",
          ["'threshold'", "'abc'", "number"], SpecError),
    _extra("option_below_minimum", {}, "synthetic:users=0", ["'users'", ">= 1", "0"], SpecError),
    _case("option_newline_in_name", {"s.txt": SEQ}, "seq:{tmp}/s.txt?x%0Ay=1", ["unknown option"], SpecError),
    _case("empty_after_filtering", {"s.txt": SEQ}, "seq:{tmp}/s.txt?min_user=1000",
          ["min_user=1000", "no interactions left"]),
    # --- seq / pairs ------------------------------------------------------------------------------
    _case("seq_non_integer_user", {"s.txt": "1 2 3\nu7 3 4\n"}, "seq:{tmp}/s.txt",
          ["s.txt", "line 2", "'user'", "'u7'"]),
    _extra("seq_non_integer_item", {"s.txt": "1 2 3\n2 3 i4\n"}, "seq:{tmp}/s.txt",
           ["s.txt", "line 2", "item 2", "'i4'"]),
    _case("seq_user_on_two_lines", {"s.txt": "1 2 3\n2 3\n1 5\n"}, "seq:{tmp}/s.txt",
          ["s.txt", "line 3", "user 1", "line 1"]),
    _extra("seq_line_without_items", {"s.txt": "1 2 3\n7\n"}, "seq:{tmp}/s.txt", ["s.txt", "line 2", "no items"]),
    _case("seq_id_beyond_int64", {"s.txt": "1 2 3\n99999999999999999999 3 4\n"}, "seq:{tmp}/s.txt",
          ["s.txt", "line 2", "'user'", "99999999999999999999"]),
    _case("pairs_non_integer_item", {"pairs.txt": "1 2\n1 x7\n"}, "pairs:{tmp}/pairs.txt",
          ["pairs.txt", "line 2", "'item'", "'x7'"]),
    _extra("pairs_missing_item", {"pairs.txt": "1 2\n3\n"}, "pairs:{tmp}/pairs.txt",
           ["pairs.txt", "line 2", "'item'", "missing"]),
    _extra("pairs_extra_field", {"pairs.txt": "1 2\n1 3 4\n"}, "pairs:{tmp}/pairs.txt", ["pairs.txt", "line 2"]),
    _case("pairs_id_beyond_int64", {"pairs.txt": "1 2\n99999999999999999999 3\n"}, "pairs:{tmp}/pairs.txt",
          ["pairs.txt", "line 2", "'user'"]),
    # --- csv -------------------------------------------------------------------------------------
    _case("csv_unknown_column", {"logs.csv": LOGS}, "csv:{tmp}/logs.csv?user=uid&item=item_id",
          ["logs.csv", "'item_id'", "uid, iid, click"]),
    _case("csv_missing_item_mapping", {"logs.csv": LOGS}, "csv:{tmp}/logs.csv?user=uid", ["item="], SpecError),
    _case("csv_empty_label", {"logs.csv": "uid,iid,click\n1,2,1\n2,3,\n"},
          "csv:{tmp}/logs.csv?user=uid&item=iid&label=click", ["logs.csv", "line 3", "'click'", "missing"]),
    _case("csv_label_two", {"logs.csv": "uid,iid,click\n1,2,1\n2,3,2\n"},
          "csv:{tmp}/logs.csv?user=uid&item=iid&label=click", ["logs.csv", "line 3", "'click'", "'2'", "0 or 1"]),
    _extra("csv_non_numeric_time", {"logs.csv": "uid,iid,ts\n1,2,100\n2,3,soon\n"},
           "csv:{tmp}/logs.csv?user=uid&item=iid&time=ts", ["logs.csv", "line 3", "'ts'", "'soon'"]),
    _extra("csv_unclosed_quote", {"logs.csv": 'uid,iid\n1,2\n"3,4\n5,6\n'}, "csv:{tmp}/logs.csv?user=uid&item=iid",
           ["logs.csv", "malformed"]),
    _case("csv_factorize_missing_user", {"logs.csv": "uid,iid\na,x\n,y\n"},
          "csv:{tmp}/logs.csv?user=uid&item=iid&ids=factorize", ["logs.csv", "line 3", "'uid'", "missing"]),
    _case("csv_missing_domain", {"logs.csv": "uid,iid,dom\n1,2,a\n2,3,\n"},
          "csv:{tmp}/logs.csv?user=uid&item=iid&domain=dom", ["logs.csv", "line 3", "'dom'", "missing"]),
    _case("csv_bad_split_value", {"logs.csv": "uid,iid,ph\n1,2,train\n2,3,training\n"},
          "csv:{tmp}/logs.csv?user=uid&item=iid&split=ph", ["logs.csv", "line 3", "'ph'", "'training'"]),
    _extra("parquet_not_parquet", {"logs.parquet": "uid,iid\n1,2\n"}, "parquet:{tmp}/logs.parquet?user=uid&item=iid",
           ["logs.parquet", "cannot read"]),
    # --- kuaisar ---------------------------------------------------------------------------------
    _case("kuaisar_no_df", {"kdir/user_features.csv": "user_id,f\n1,0\n"}, "kuaisar:{tmp}/kdir", ["kdir", "df.csv"]),
    _case("kuaisar_click_misnamed", {"kdir/df.csv": DF.replace("is_click", "clicked")}, "kuaisar:{tmp}/kdir",
          ["df.csv", "'is_click'", "clicked"]),
    _extra("kuaisar_click_five", {"kdir/df.csv": DF_HEAD + "1,10,1000,1\n2,11,2000,5\n"}, "kuaisar:{tmp}/kdir",
           ["df.csv", "line 3", "'is_click'", "5"]),
    _case("kuaisar_duplicate_user_feature",
          {"kdir/df.csv": DF, "kdir/user_features.csv": "user_id,f\n1,0\n2,1\n1,2\n"}, "kuaisar:{tmp}/kdir",
          ["user_features.csv", "line 4", "'user_id'", "duplicate", "1"]),
    _extra("kuaisar_user_without_features", {"kdir/df.csv": DF, "kdir/user_features.csv": "user_id,f\n1,0\n"},
           "kuaisar:{tmp}/kdir", ["user_features.csv", "'user_id'", "no feature row", "2"]),
    # --- cdr ---------------------------------------------------------------------------------------
    _case("cdr_one_domain", CDR_AB, "cdr:{tmp}/c", ["/c", "two domain folders"]),
    _extra("cdr_missing_test", {**CDR_AB, "c/b_a/train.txt": "0\t1\n"}, "cdr:{tmp}/c", ["b_a", "test.txt"]),
    _extra("cdr_negative_item", {**CDR_AB, **CDR_BA, "c/b_a/train.txt": "0\t1\n1\t-4\n"}, "cdr:{tmp}/c",
           ["train.txt", "line 2", "'item'", "-4"]),
    _extra("cdr_not_tab_separated", {**CDR_AB, **CDR_BA, "c/b_a/train.txt": "0 1\n1 0\n"}, "cdr:{tmp}/c",
           ["b_a", "train.txt", "tab"]),
    # --- movielens ---------------------------------------------------------------------------------
    _case("movielens_too_few_fields", {"u.data": "1\t2\t5\t881250949\n2\t3\n"}, "movielens:{tmp}/u.data",
          ["u.data", "line 2", "'rating'", "missing"]),
    _case("movielens_non_numeric_rating", {"u.data": "1\t2\t5\t881250949\n2\t3\tfive\t881250950\n"},
          "movielens:{tmp}/u.data", ["u.data", "line 2", "'rating'", "'five'"]),
    _extra("movielens_dat_too_few_fields", {"ratings.dat": "1::2::5::978300760\n2::3::4\n"},
           "movielens:{tmp}/ratings.dat", ["ratings.dat", "line 2", "'time'"]),
    _extra("movielens_dir_without_ratings", {"ml/u.item": "1|Toy Story (1995)|01-Jan-1995||url|0\n"},
           "movielens:{tmp}/ml", ["ml", "u.data", "ratings.dat"]),
    _extra("movielens_bad_user_age", {"u.data": UDATA, "u.user": "1|24|M|tech|12345\n2|x|F|other|2\n"},
           "movielens:{tmp}/u.data", ["u.user", "line 2", "'age'", "'x'"]),
    _case("movielens_first_line_extra_field", {"u.data": "1\t2\t5\t881250949\t7\n2\t3\t4\t881250950\n"},
          "movielens:{tmp}/u.data", ["u.data", "line 1"]),
    _case("movielens_duplicate_user_feature", {"u.data": UDATA, "u.user": "1|24|M|t|1\n2|30|F|a|2\n1|40|F|a|3\n"},
          "movielens:{tmp}/u.data", ["u.user", "line 3", "duplicate"]),
]

CASE_LIST = [p.values[0] for p in CASES]
CLI_CASES = [p for p in CASES if p.values[0].cli]


def _build(case: Case, root: Path) -> str:
    """Write the case's files under ``root`` and return its spec."""
    for name, content in case.files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return case.spec.replace("{tmp}", str(root))


def _assert_mentions(message: str, expect: tuple[Expect, ...]) -> None:
    for want in expect:
        options = (want,) if isinstance(want, str) else want
        assert any(o in message for o in options), f"{message!r} does not mention {want!r}"


def test_case_ids_are_unique():
    ids = [c.id for c in CASE_LIST]
    assert len(ids) == len(set(ids)) and len(CLI_CASES) >= 16


@pytest.mark.parametrize("case", CASES)
def test_library_error(case: Case, tmp_path: Path):
    spec = _build(case, tmp_path)
    with pytest.raises(FedrecError) as info:
        load_dataset(spec)
    assert isinstance(info.value, case.error)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    _assert_mentions(message, case.expect)


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Run ``fedrec data describe`` on every CLI case up front, as many at once as there are CPUs."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # as a user runs it

    def run(case: Case) -> subprocess.CompletedProcess:
        spec = _build(case, tmp_path_factory.mktemp(case.id))
        return subprocess.run(
            [sys.executable, "-m", "fedrec.cli", "data", "describe", spec],
            capture_output=True, text=True, timeout=120, env=env,
        )

    cases = [p.values[0] for p in CLI_CASES]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(zip((c.id for c in cases), pool.map(run, cases)))


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_error(case: Case, cli_results):
    result = cli_results[case.id]
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fedrec: error:")
    _assert_mentions(lines[0], case.expect)


def test_gz_loads_like_plain(tmp_path: Path):
    plain = tmp_path / "plain" / "s.txt"
    packed = tmp_path / "packed" / "s.txt.gz"
    plain.parent.mkdir()
    packed.parent.mkdir()
    plain.write_text(SEQ)
    packed.write_bytes(gzip.compress(SEQ.encode()))
    a = load_dataset(f"seq:{plain}").interactions.frame
    b = load_dataset(f"seq:{packed}").interactions.frame
    c = load_dataset(f"seq:{packed.parent / 's.txt'}").interactions.frame  # falls back to s.txt.gz
    assert len(a) == 7
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(a, c)


def test_large_int_ids_are_exact(tmp_path: Path):
    path = tmp_path / "pairs.txt"
    path.write_text("9007199254740993 2\n")
    frame = load_dataset(f"pairs:{path}").interactions.frame
    assert frame["user"].tolist() == [9007199254740993]
