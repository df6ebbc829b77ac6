"""Each source on tiny hand-written files: the canonical table it returns."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest
import torch

from fedrec.data import known_formats, load_dataset
from fedrec.errors import DataError, SpecError


def write(path, text):
    path.write_text(text)
    return path


def test_every_documented_format_is_registered():
    """The data page's table of formats names exactly the registered formats."""
    import re
    from pathlib import Path

    assert known_formats() == ["atomic", "cdr", "csv", "kuaisar", "movielens", "pairs", "parquet", "recbole",
                               "recflow", "seq", "synthetic"]
    readme = (Path(__file__).resolve().parents[2] / "fedrec" / "data" / "README.md").read_text()
    table = readme.split("| format | spec | what it reads | options |", 1)[1].split("\n\n", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)? \|", table, flags=re.M))
    names = {n for pair in documented for n in pair if n}
    assert names == set(known_formats())


def test_seq_positions_become_time(tmp_path):
    f = write(tmp_path / "s.txt", "1 5 6 7\n2 6 8\n")
    frame = load_dataset(f"seq:{f}").interactions.frame
    assert frame.user.tolist() == [1, 1, 1, 2, 2]
    assert frame.item.tolist() == [5, 6, 7, 6, 8]
    assert frame.time.tolist() == [0, 1, 2, 0, 1]
    assert "label" not in frame.columns


def test_pairs_interleaved_users_keep_their_own_order(tmp_path):
    f = write(tmp_path / "p.txt", "1 10\n2 20\n1 11\n2 21\n1 12\n")
    frame = load_dataset(f"pairs:{f}").interactions.frame
    assert frame[frame.user == 1].time.tolist() == [0, 1, 2]
    assert frame[frame.user == 2].item.tolist() == [20, 21]


def test_gzip_is_transparent_even_when_the_spec_omits_gz(tmp_path):
    plain = write(tmp_path / "a.txt", "1 5 6 7\n2 6 8\n")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as h:
        h.write(plain.read_text())
    a = load_dataset(f"seq:{plain}").interactions.frame
    pd.testing.assert_frame_equal(a, load_dataset(f"seq:{tmp_path}/b.txt.gz").interactions.frame)
    pd.testing.assert_frame_equal(a, load_dataset(f"seq:{tmp_path}/b.txt").interactions.frame)


def test_movielens_100k_threshold_and_features(tmp_path):
    write(tmp_path / "u.data", "1\t10\t5\t100\n1\t11\t3\t90\n2\t10\t4\t50\n")
    write(tmp_path / "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n")
    genres = "|".join(["0"] * 19)
    write(tmp_path / "u.item", f"10|A (1995)|01-Jan-1995||url|{genres}\n11|B (1980)|01-Jan-1980||url|0|1|1{'|0' * 16}\n")
    ds = load_dataset(f"movielens:{tmp_path}/u.data")
    frame = ds.interactions.frame
    assert frame.label.tolist() == [1, 0, 1] and frame.rating.tolist() == [5.0, 3.0, 4.0]
    assert load_dataset(f"movielens:{tmp_path}/u.data?threshold=5").interactions.frame.label.tolist() == [1, 0, 0]
    assert ds.user_features.loc[1, "age"] == 2  # 18-24 band (bands 1, 18, 25, ...) -> code 2
    assert ds.user_features.loc[2, "age"] == 6  # 50-55 -> code 6
    assert ds.item_features.loc[11, "genre1"] == 2 and ds.item_features.loc[11, "genre2"] == 3
    assert ds.item_features.loc[10, "genre1"] == 0  # no genre flag -> 0
    assert ds.item_features.loc[10, "decade"] != ds.item_features.loc[11, "decade"]
    assert load_dataset(f"movielens:{tmp_path}/u.data?features=false").user_features is None


def test_movielens_implicit_makes_every_rating_a_positive(tmp_path):
    write(tmp_path / "u.data", "1\t10\t5\t100\n1\t11\t1\t90\n2\t10\t2\t50\n")
    ds = load_dataset(f"movielens:{tmp_path}/u.data?implicit=true&features=false")
    assert not ds.interactions.has_labels and ds.interactions.frame.rating.tolist() == [5.0, 1.0, 2.0]
    assert ds.meta["implicit"] is True and ds.meta["threshold"] is None
    # threshold=0 labels every rating positive (a label column, all ones)
    assert load_dataset(f"movielens:{tmp_path}/u.data?threshold=0").interactions.frame.label.tolist() == [1, 1, 1]
    with pytest.raises(SpecError, match="'implicit' and 'threshold' exclude each other"):
        load_dataset(f"movielens:{tmp_path}/u.data?implicit=true&threshold=3")
    with pytest.raises(SpecError, match="'implicit' must be true or false"):
        load_dataset(f"movielens:{tmp_path}/u.data?implicit=maybe")


def test_movielens_1m_double_colon_format(tmp_path):
    write(tmp_path / "ratings.dat", "1::10::5::100\n2::11::2::50\n")
    write(tmp_path / "users.dat", "1::M::25::4::55455\n2::F::1::10::48067\n")
    write(tmp_path / "movies.dat", "10::Toy Story (1995)::Animation|Comedy\n11::Heat (1995)::Action\n")
    ds = load_dataset(f"movielens:{tmp_path}")
    assert ds.interactions.frame.label.tolist() == [1, 0]
    assert ds.item_features.loc[10, "genre2"] > 0 and ds.item_features.loc[11, "genre2"] == 0
    assert ds.user_features.loc[1, "age"] == 3 and ds.user_features.loc[2, "age"] == 1


def test_kuaisar_layout(tmp_path):
    write(tmp_path / "df.csv", "user_id,video_id,timestamp,is_click\n0,0,5.0,1\n1,2,3.0,0\n0,2,6.0,0\n")
    write(tmp_path / "user_features.csv", "user_id,f1,f2\n1,3,0\n0,1,2\n")
    write(tmp_path / "video_features.csv", "video_id,cat\n2,4\n0,0\n")
    ds = load_dataset(f"kuaisar:{tmp_path}")
    assert ds.interactions.frame.time.dtype == np.int64
    assert ds.user_features.loc[0].tolist() == [2, 3]  # by id, codes + 1
    assert ds.user_features.loc[1].tolist() == [4, 1]
    assert ds.item_features.loc[0, "cat"] == 1


def test_csv_mapping_time_label_and_factorized_ids(tmp_path):
    f = write(tmp_path / "logs.csv", "uid,iid,ts,click\nalice,x,3,1\nbob,y,1,0\nalice,y,2,0\n")
    ds = load_dataset(f"csv:{f}?user=uid&item=iid&time=ts&label=click&ids=factorize")
    frame = ds.interactions.frame
    assert frame.user.tolist() == [0, 1, 0] and frame.item.tolist() == [0, 1, 1]
    assert frame.time.tolist() == [3, 1, 2] and frame.label.tolist() == [1, 0, 0]


def test_csv_without_header_label_from_rating_and_tab(tmp_path):
    f = write(tmp_path / "r.tsv", "1\t2\t4.5\n1\t3\t2.0\n")
    frame = load_dataset(f"csv:{f}?header=false&sep=tab&user=0&item=1&rating=2&label_from_rating=4").interactions.frame
    assert frame.label.tolist() == [1, 0] and frame.time.tolist() == [0, 1]


def test_csv_value_column_reaches_the_split_and_the_batches(tmp_path):
    """A watch-time-like ``value`` column: canonical, kept per row by the split, carried by
    next-item batches as ``values`` / ``target_values`` (CRM's condition)."""
    from fedrec.data.batching import build_examples, iterate_batches
    from fedrec.data.split import split_dataset

    rows = "".join(f"{u},{i},{t},{w}\n" for u in (1, 2) for t, (i, w) in enumerate([(5, 10.5), (6, 3), (7, 80), (8, 1)]))
    f = write(tmp_path / "w.csv", "u,i,t,watch\n" + rows)
    ds = load_dataset(f"csv:{f}?user=u&item=i&time=t&value=watch")
    assert ds.interactions.frame.value.tolist()[:4] == [10.5, 3.0, 80.0, 1.0]
    sp = split_dataset(ds)
    batch = next(iterate_batches(build_examples(sp, task="next_item", stage="train", max_len=3), batch_size=2))
    assert batch["values"].shape == batch["items"].shape and "ratings" not in batch
    # train rows of each user: item 5 (10.5) then item 6 (3): history 5 -> target 6; NaN = padding
    assert batch["values"][0, -1].item() == 10.5 and batch["target_values"][0, -1].item() == 3.0
    assert torch.isnan(batch["values"][0, :2]).all() and torch.isnan(batch["target_values"][0, :2]).all()
    bad = write(tmp_path / "bad.csv", "u,i,t,watch\n1,5,0,fast\n")
    with pytest.raises(DataError, match="watch"):
        load_dataset(f"csv:{bad}?user=u&item=i&time=t&value=watch")


def test_parquet_mapping(tmp_path):
    path = tmp_path / "logs.parquet"
    pd.DataFrame({"u": [1, 1, 2], "i": [5, 6, 5], "t": [1, 2, 1], "d": ["a", "b", "a"]}).to_parquet(path)
    frame = load_dataset(f"parquet:{path}?user=u&item=i&time=t&domain=d").interactions.frame
    assert frame.domain.tolist() == ["a", "b", "a"] and frame.item.tolist() == [5, 6, 5]


def test_cdr_layout_shared_users_and_item_offsets(tmp_path):
    for folder, rows in {"a_b": ("0\t0\n1\t1\n2\t0\n", "0\t1\n"), "b_a": ("0\t0\n2\t1\n", "2\t0\n")}.items():
        (tmp_path / folder).mkdir()
        write(tmp_path / folder / "train.txt", rows[0])
        write(tmp_path / folder / "test.txt", rows[1])
    frame = load_dataset(f"cdr:{tmp_path}").interactions.frame
    assert sorted(frame.domain.unique()) == ["a", "b"]
    a, b = frame[frame.domain == "a"], frame[frame.domain == "b"]
    assert set(a.item) & set(b.item) == set()  # per-domain items never collide
    assert set(frame.split) == {"train", "test"}
    # ids >= shared_users are different people in the two domains
    frame2 = load_dataset(f"cdr:{tmp_path}?shared_users=1").interactions.frame
    users_a = set(frame2[frame2.domain == "a"].user)
    users_b = set(frame2[frame2.domain == "b"].user)
    assert users_a & users_b == {0}
    # UniCDR's dual-user-intra: the test file doubles as validation
    frame3 = load_dataset(f"cdr:{tmp_path}?valid=test").interactions.frame
    assert (frame3.split == "valid").sum() == (frame3.split == "test").sum() == 2


def test_min_user_and_min_item_filters(tmp_path):
    f = write(tmp_path / "s.txt", "1 5 6 7\n2 6 8\n3 5 6 9 10\n")
    frame = load_dataset(f"seq:{f}?min_user=3").interactions.frame
    assert sorted(frame.user.unique()) == [1, 3]
    frame = load_dataset(f"seq:{f}?min_item=2").interactions.frame
    assert set(frame.item) == {5, 6}


def test_cdr_validation_holdout_when_the_folder_has_no_valid_file(tmp_path):
    # two domain folders without valid.txt: each (user, domain) with >= 2 training rows gives
    # its last training row (file order) to validation; valid=test reuses the test file
    for name in ("a_b", "b_a"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.txt").write_text("0\t1\n0\t2\n0\t3\n1\t4\n")
        (tmp_path / name / "test.txt").write_text("0\t5\n1\t6\n")
    frame = load_dataset(f"cdr:{tmp_path}").interactions.frame
    a = frame[frame["domain"] == "a"]
    assert a.loc[a["split"] == "valid", ["user", "item"]].values.tolist() == [[0, 3]]
    assert sorted(a.loc[a["split"] == "train", "item"]) == [1, 2, 4]  # user 1 has one row: kept
    same = load_dataset(f"cdr:{tmp_path}?valid=test").interactions.frame
    assert (same["split"] == "valid").sum() == (same["split"] == "test").sum() == 4
    with pytest.raises(DataError, match="valid=file: no valid.txt"):
        load_dataset(f"cdr:{tmp_path}?valid=file")


def test_ctr_negatives_cast_implicit_feedback_as_ctr(tmp_path):
    """Every interaction a click followed by K non-clicks of the same user, time, domain and
    split, each an item of that domain the user never interacted with."""
    for folder, rows in {"a_b": ("0\t0\n0\t1\n1\t1\n2\t0\n2\t2\n3\t4\n4\t5\n", "0\t2\n"),
                         "b_a": ("0\t0\n0\t3\n2\t1\n3\t4\n4\t2\n", "2\t0\n")}.items():
        (tmp_path / folder).mkdir()
        write(tmp_path / folder / "train.txt", rows[0])
        write(tmp_path / folder / "test.txt", rows[1])
    plain = load_dataset(f"cdr:{tmp_path}").interactions.frame
    frame = load_dataset(f"cdr:{tmp_path}?ctr_negatives=2&negatives_seed=3").interactions.frame
    assert len(frame) == 3 * len(plain) and frame.label.tolist()[:3] == [1, 0, 0]
    clicks = frame[frame.label == 1].reset_index(drop=True)
    assert clicks.drop(columns="label").equals(plain)
    seen = set(zip(plain.user, plain.domain, plain.item))
    for i, neg in frame[frame.label == 0].iterrows():
        pos = frame.iloc[i - 1] if frame.iloc[i - 1].label == 1 else frame.iloc[i - 2]
        assert (neg.user, neg.time, neg.domain, neg.split) == (pos.user, pos.time, pos.domain, pos.split)
        assert (neg.user, neg.domain, neg["item"]) not in seen
        assert neg["item"] in set(plain[plain.domain == neg.domain]["item"])
    with pytest.raises(DataError, match="already has click labels"):
        load_dataset("synthetic:users=10,items=20,seed=0,ctr_negatives=1")
    # without the files' own split the held-out rows would be sampled non-clicks: refused
    plain_seq = tmp_path / "s.txt"
    write(plain_seq, "1 1 2 3\n2 1 3\n")
    with pytest.raises(DataError, match="ctr_negatives needs data whose files fix their own"):
        load_dataset(f"seq:{plain_seq}?ctr_negatives=1")
    # a user who has every item of a domain: nothing to sample
    full = tmp_path / "full"
    for folder, rows in {"a_b": ("0\t0\n0\t1\n1\t0\n", "0\t1\n"), "b_a": ("0\t0\n1\t1\n", "1\t0\n")}.items():
        (full / folder).mkdir(parents=True)
        write(full / folder / "train.txt", rows[0])
        write(full / folder / "test.txt", rows[1])
    with pytest.raises(DataError, match="user 0 has interacted with every item of domain 'a'"):
        load_dataset(f"cdr:{full}?ctr_negatives=1")
