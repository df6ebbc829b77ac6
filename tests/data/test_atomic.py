"""``atomic:DIR`` / ``recbole:DIR``: RecBole's atomic files, on tiny hand-written folders
(fields, features, ids, the errors naming file, line and field) and on RecBole's own copy of
MovieLens-100K against ``movielens:`` on the GroupLens file."""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.data import load_dataset
from fedrec.errors import DataError, SpecError

INTER = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\treview:token_seq\n"
         "1\t10\t5\t100\tgreat film\n"
         "1\t11\t3\t200\t\n"
         "2\t10\t4\t150\tok\n"
         "2\t12\t1\t120\tbad\n")
USER = "user_id:token\tgender:token\tage:float\n1\tF\t30\n2\tM\t\n3\tF\t20\n"
ITEM = "item_id:token\tgenre:token\ttitle:token_seq\n10\tdrama\tA film\n11\tcomedy\tB\n12\t\tC\n99\tdrama\tnever seen\n"


def _folder(tmp_path, name="toy", inter=INTER, user=USER, item=ITEM):
    d = tmp_path / name
    d.mkdir()
    (d / f"{name}.inter").write_text(inter)
    if user is not None:
        (d / f"{name}.user").write_text(user)
    if item is not None:
        (d / f"{name}.item").write_text(item)
    return d


def test_fields_map_to_the_canonical_table(tmp_path):
    ds = load_dataset(f"atomic:{_folder(tmp_path)}")
    f = ds.interactions.frame
    assert f["user"].tolist() == [1, 1, 2, 2] and f["item"].tolist() == [10, 11, 10, 12]
    assert f["time"].tolist() == [100, 200, 150, 120] and f["rating"].tolist() == [5.0, 3.0, 4.0, 1.0]
    assert "label" not in f.columns  # no label field: implicit positives, as in RecBole
    assert ds.meta["fields"] == {"user": "user_id", "item": "item_id", "time": "timestamp", "rating": "rating"}
    # the alias reads the same
    assert load_dataset(f"recbole:{_folder(tmp_path, 'toy2')}").interactions.frame.equals(f)


def test_token_side_fields_become_coded_feature_tables(tmp_path):
    ds = load_dataset(f"atomic:{_folder(tmp_path)}")
    # token fields only (age is float, title token_seq); codes 1..K in sorted order, 0 = empty
    assert list(ds.user_features.columns) == ["gender"]
    assert ds.user_features.loc[[1, 2, 3], "gender"].tolist() == [1, 2, 1]  # F < M
    assert list(ds.item_features.columns) == ["genre"]
    assert ds.item_features.loc[[10, 11, 12, 99], "genre"].tolist() == [2, 1, 0, 2]  # comedy < drama; empty -> 0
    assert load_dataset(f"atomic:{_folder(tmp_path, 'b')}?features=false").user_features is None


def test_options_rename_fields_label_threshold_and_name(tmp_path):
    inter = "uid:token\tiid:token\tts:token\tclick:float\tstars:float\n7\ta\t2024-01-02\t1\t4\n7\tb\t2024-01-03\t0\t2\n"
    d = tmp_path / "multi"
    d.mkdir()
    (d / "one.inter").write_text(inter)
    (d / "two.inter").write_text(INTER)
    with pytest.raises(SpecError, match=r"several datasets \(one, two\); choose one with \?name=NAME"):
        load_dataset(f"atomic:{d}")
    ds = load_dataset(f"atomic:{d}?name=one&user=uid&item=iid&time=ts&label=click&rating=stars")
    f = ds.interactions.frame
    # string item tokens are coded in order of first appearance; ISO dates become epoch seconds
    assert f["item"].tolist() == [0, 1] and ds.meta["ids"] == {"user": "int", "item": "factorized"}
    assert f["time"].tolist() == [1704153600, 1704240000] and f["label"].tolist() == [1, 0]
    by_rating = load_dataset(f"atomic:{d}?name=two&threshold=4").interactions.frame
    assert by_rating["label"].tolist() == [1, 0, 1, 0]
    # a .inter file named directly
    assert len(load_dataset(f"atomic:{d / 'two.inter'}").interactions) == 4
    with pytest.raises(DataError, match="no three.inter in this folder"):
        load_dataset(f"atomic:{d}?name=three")
    with pytest.raises(DataError, match=r"one.inter, line 1, column 'when': no such field for 'time=when'"):
        load_dataset(f"atomic:{d}?name=one&user=uid&item=iid&time=when")


@pytest.mark.parametrize("inter,needle", [
    ("user_id\titem_id:token\n1\t2\n", r"toy.inter, line 1, column 'user_id': header field has no ':type'"),
    ("user_id:token\titem_id:id\n1\t2\n", r"line 1, column 'item_id': unknown field type 'id' \(known: token"),
    ("user_id:token\titem_id:token\trating:float\n1\t2\t5\n1\t3\tgood\n",
     r"toy.inter, line 3, column 'rating': expected a number \(got 'good'\)"),
    ("user_id:token\titem_id:token\tv:float_seq\n1\t2\t1 2 x\n", r"line 2, column 'v': expected space-separated"),
    ("uid:token\titem_id:token\n1\t2\n", r"line 1, column 'user_id': no such field for 'user' \(default field user_id\)"),
    ("user_id:token\titem_id:token\n1\t2\n\t3\n", r"line 3, column 'user_id': missing value"),
    ("user_id:token\titem_id:token\tlabel:float\n1\t2\t3\n", r"line 2, column 'label': label must be 0 or 1"),
    ("user_id:token\titem_id:token\ttimestamp:token\n1\t2\t2024-01-02\n1\t3\tsoon\n",
     r"line 3, column 'timestamp': expected an ISO 8601 date/time"),
])
def test_bad_files_are_one_line_naming_file_line_and_field(tmp_path, inter, needle):
    d = _folder(tmp_path, inter=inter, user=None, item=None)
    with pytest.raises(DataError, match=needle) as info:
        load_dataset(f"atomic:{d}")
    assert "\n" not in str(info.value)


def test_bad_folders_and_side_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty: no NAME.inter file in this folder"):
        load_dataset(f"atomic:{empty}")
    with pytest.raises(DataError, match="directory not found"):
        load_dataset(f"atomic:{tmp_path / 'absent'}")
    d = _folder(tmp_path, user="uid:token\tgender:token\n1\tF\n")
    with pytest.raises(DataError, match=r"toy.user, line 1, column 'user_id': no 'user_id' field"):
        load_dataset(f"atomic:{d}")
    d = _folder(tmp_path, "dup", user="user_id:token\tgender:token\n1\tF\n1\tM\n")
    with pytest.raises(DataError, match=r"dup.user, line 3, column 'user_id': id appears twice"):
        load_dataset(f"atomic:{d}")
    ints = _folder(tmp_path, "ints", inter="user_id:token\titem_id:token\n1\tA7\n", user=None, item=None)
    with pytest.raises(DataError, match=r"ints.inter, line 2, column 'item_id': expected an integer"):
        load_dataset(f"atomic:{ints}?ids=int")


@pytest.mark.realdata
def test_recbole_ml100k_equals_movielens(shared_data):
    """RecBole's atomic copy of MovieLens-100K holds the interactions of the GroupLens file:
    the same (user, item, time, rating) rows, so the same split and the same ids."""
    from fedrec.data.split import split_dataset

    atomic = load_dataset(f"atomic:{shared_data}/ml-100k/recbole")
    movielens = load_dataset(f"movielens:{shared_data}/ml-100k/u.data?implicit=true")
    key = ["user", "item", "time", "rating"]
    a = atomic.interactions.frame[key].sort_values(key).to_numpy()
    m = movielens.interactions.frame[key].sort_values(key).to_numpy()
    assert a.shape == (100_000, 4) and np.array_equal(a, m)
    sa, sm = split_dataset(atomic), split_dataset(movielens)
    for name in ("user_raw", "item_raw", "item", "time", "part"):
        assert np.array_equal(getattr(sa, name), getattr(sm, name)), name
    assert list(atomic.user_features.columns) == ["age", "gender", "occupation", "zip_code"]
    assert list(atomic.item_features.columns) == ["release_year"]
    assert atomic.user_features.shape[0] == 943 and atomic.item_features.shape[0] == 1682
