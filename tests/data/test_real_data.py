"""``fedrec data describe`` on every folder of ../shared/data reproduces the statistics in
the folders' SOURCE.md files and reference/datasets_and_anchors.md, exactly.

Also: the KuaiSAR-R split rebuilt from ``df.csv`` equals the release's own split files.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fedrec.data import load_dataset
from fedrec.data.describe import describe
from fedrec.data.split import TEST, TRAIN, VALID, split_dataset

pytestmark = pytest.mark.realdata


def stats_of(spec: str) -> dict:
    return describe(load_dataset(spec))


def test_kuaisar_matches_source(shared_data):
    s = stats_of(f"kuaisar:{shared_data}/KuaiSAR-R")
    assert (s["users"], s["items"], s["interactions"]) == (1791, 69704, 117590)
    assert round(s["label_rate"], 3) == 0.514
    sl = s["sequence_length"]
    assert (sl["p0"], sl["p50"], sl["p100"], round(sl["mean"], 1)) == (10, 33, 1029, 65.7)
    assert s["domains"] is None
    assert s["user_features"] == ["onehot_feat1", "onehot_feat2", "search_active_level", "reco_active_level"]
    assert len(s["item_features"]) == 6


def test_kuaisar_features_are_looked_up_by_id(shared_data):
    ds = load_dataset(f"kuaisar:{shared_data}/KuaiSAR-R")
    import pandas as pd

    raw = pd.read_csv(shared_data / "KuaiSAR-R" / "user_features.csv").set_index("user_id")
    assert raw.index[0] != 0  # the file is not sorted by id: row position != user id
    for user in (0, 660, 1043, 1790):
        assert list(ds.user_features.loc[user]) == list(raw.loc[user] + 1)


def test_kuaisar_split_equals_release_split_files(shared_data):
    folder = shared_data / "KuaiSAR-R"
    split = split_dataset(load_dataset(f"kuaisar:{folder}"))
    release = {}
    for part in ("train", "valid", "test"):
        for kind in ("data", "label"):
            # the release stores pickled dicts {user_id: list}; they reference only numpy helpers
            release[part, kind] = np.load(folder / f"leave_one_split_user_{part}_{kind}.npy", allow_pickle=True).item()
    assert split.n_sequences == len(release["train", "data"]) == 1791
    mismatches = 0
    for s in range(split.n_sequences):
        user = int(split.user_raw[split.seq_user[s]])
        for part, code in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
            ours = split.sequence_items(s, (code,))
            ours = np.where(ours == 0, 69704, ours)  # the release's re-mapping of video 0
            theirs = np.atleast_1d(release[part, "data"][user])
            labels = np.atleast_1d(release[part, "label"][user])
            if not (np.array_equal(ours, theirs) and np.array_equal(split.sequence_labels(s, (code,)), labels)):
                mismatches += 1
    assert mismatches == 0
    rates = {name: float(split.label[split.part == code].mean()) for name, code in (("train", TRAIN), ("valid", VALID), ("test", TEST))}
    assert (round(rates["train"], 3), round(rates["valid"], 3), round(rates["test"], 3)) == (0.513, 0.559, 0.523)


def test_movielens_100k(shared_data):
    s = stats_of(f"movielens:{shared_data}/ml-100k/u.data")
    assert (s["users"], s["items"], s["interactions"]) == (943, 1682, 100000)
    assert s["sequence_length"]["p0"] == 20
    assert s["repeated_pairs"] == 0
    assert s["rating"] == {"min": 1.0, "max": 5.0, "mean": pytest.approx(3.52986)}
    assert s["time"]["min"] == 874724710 and s["time"]["max"] == 893286638
    assert s["label_rate"] == pytest.approx(0.55375)  # share of ratings >= 4
    assert s["user_features"] == ["age", "gender", "occupation", "zip1"]
    # a directory works too, and the threshold option changes only the labels
    s3 = stats_of(f"movielens:{shared_data}/ml-100k?threshold=3")
    assert s3["interactions"] == 100000 and s3["label_rate"] > s["label_rate"]


@pytest.mark.parametrize(
    "name, users, items, interactions, min_len",
    [("Beauty", 22363, 12101, 198502, 5), ("LastFM", 1090, 3646, 52551, 5)],
)
def test_s3rec_sequences(shared_data, name, users, items, interactions, min_len):
    s = stats_of(f"seq:{shared_data}/s3rec/{name}.txt")
    assert (s["users"], s["items"], s["interactions"]) == (users, items, interactions)
    assert s["sequence_length"]["p0"] == min_len
    assert s["label_rate"] is None
    assert s["repeated_pairs"] == 0


def test_sasrec_games_pairs(shared_data):
    s = stats_of(f"pairs:{shared_data}/amazon-games-sasrec/Video.txt")
    assert (s["users"], s["items"], s["interactions"]) == (31013, 23715, 287107)
    assert round(s["sequence_length"]["mean"], 2) == 9.26
    assert s["sequence_length"]["p0"] == 1
    assert s["repeated_pairs"] == 0


def test_pfedrec_amazon_video_csv(shared_data):
    spec = (f"csv:{shared_data}/amazon-video-pfedrec/ratings.dat"
            "?header=false&user=0&item=1&rating=2&time=3&ids=factorize")
    s = stats_of(spec)
    assert (s["users"], s["items"], s["interactions"]) == (8072, 11830, 63836)
    assert s["sequence_length"]["p0"] == 5
    assert s["repeated_pairs"] == 0
    assert (s["rating"]["min"], s["rating"]["max"]) == (1.0, 5.0)


def test_disencdr_sport_cloth(shared_data):
    # the files' own training rows (valid=test: validation reuses the test file, as UniCDR's code)
    s = stats_of(f"cdr:{shared_data}/DisenCDR-sport_cloth?valid=test")
    sport, cloth = s["domains"]["sport"], s["domains"]["cloth"]
    assert list(s["domains"]) == ["sport", "cloth"]
    assert (sport["splits"]["train"]["interactions"], sport["splits"]["train"]["users"],
            sport["splits"]["train"]["items"]) == (92612, 9928, 30796)
    assert (cloth["splits"]["train"]["interactions"], cloth["splits"]["train"]["users"],
            cloth["splits"]["train"]["items"]) == (87829, 9928, 39008)
    assert sport["splits"]["test"]["interactions"] == 8326
    assert cloth["splits"]["test"]["interactions"] == 7540
    assert s["users"] == s["users_in_all_domains"] == 9928
    original = stats_of(f"cdr:{shared_data}/DisenCDR-sport_cloth?test=test_original")
    assert original["domains"]["sport"]["splits"]["test"]["interactions"] == 9928
    assert original["domains"]["cloth"]["splits"]["test"]["interactions"] == 9928
    # the default (no valid.txt): each (user, domain) with >= 2 training rows gives its last one
    # to validation
    held = stats_of(f"cdr:{shared_data}/DisenCDR-sport_cloth")["domains"]["sport"]["splits"]
    assert held["train"]["interactions"] + held["valid"]["interactions"] == 92612
    assert held["valid"]["interactions"] == held["valid"]["users"] == 9928


def test_cdrib_game_video_cold_start(shared_data):
    s = stats_of(f"cdr:{shared_data}/CDRIB-game_video?shared_users=2179")
    game, video = s["domains"]["game"], s["domains"]["video"]
    assert (game["splits"]["train"]["interactions"], game["splits"]["train"]["users"],
            game["splits"]["train"]["items"]) == (155036, 24799, 12319)
    assert (video["splits"]["train"]["interactions"], video["splits"]["train"]["users"],
            video["splits"]["train"]["items"]) == (156091, 19240, 8751)
    assert (game["splits"]["valid"]["users"], game["splits"]["test"]["users"]) == (213, 212)
    assert (video["splits"]["valid"]["users"], video["splits"]["test"]["users"]) == (210, 216)
    assert s["users_in_all_domains"] == 2179
    # Game's cold-start users (1953..2178) have no Game training rows
    frame = load_dataset(f"cdr:{shared_data}/CDRIB-game_video?shared_users=2179").interactions.frame
    game_train = frame[(frame.domain == "game") & (frame.split == "train")]
    assert not game_train.user.between(1953, 2178).any()


def test_cli_json_on_real_data(shared_data):
    out = subprocess.run(
        [sys.executable, "-m", "fedrec.cli", "data", "describe", f"movielens:{shared_data}/ml-100k/u.data", "--json"],
        capture_output=True, text=True, check=True,
    )
    stats = json.loads(out.stdout)
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100000)
    assert stats["domains"] is None
