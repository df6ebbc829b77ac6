"""The Moment streaming trainer: label events of each strategy, history labels as known at a
time, the history index, and a small stream end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from fedrec.data import load_dataset
from fedrec.data.split import split_dataset
from fedrec.errors import ConfigError
from fedrec.streaming import StreamConfig, _history, history_labels, label_events, stream_train

TIME = np.array([0.0, 100.0, 200.0, 300.0])
LABEL = np.array([1, 0, 1, 1])
ARRIVAL = np.array([50.0, np.inf, 1200.0, 5000.0])  # the last click comes after the horizon: lost


def _events(strategy):
    ev = label_events(TIME, LABEL, ARRIVAL, StreamConfig(strategy=strategy, window=500.0, horizon=3600.0))
    return sorted(zip(ev["row"].tolist(), ev["at"].tolist(), ev["target"].tolist(), ev["weight"].tolist()))


def test_final_label_trains_every_sample_once_with_its_final_label():
    assert _events("final-label") == [(0, 3600.0, 1.0, 1.0), (1, 3700.0, 0.0, 1.0), (2, 3800.0, 1.0, 1.0),
                                      (3, 3900.0, 0.0, 1.0)]


def test_first_label_trains_a_click_at_its_arrival_and_a_non_click_when_final():
    assert _events("first-label") == [(0, 50.0, 1.0, 1.0), (1, 3700.0, 0.0, 1.0), (2, 1200.0, 1.0, 1.0),
                                      (3, 3900.0, 0.0, 1.0)]


def test_fast_slow_corrects_a_late_click():
    # fast at exposure + window with what is known; the click of row 2 (at 1200 > 700) comes
    # late: + positive - negative at its arrival
    assert _events("fast-slow") == [(0, 500.0, 1.0, 1.0), (1, 600.0, 0.0, 1.0), (2, 700.0, 0.0, 1.0),
                                    (2, 1200.0, 0.0, -1.0), (2, 1200.0, 1.0, 1.0), (3, 800.0, 0.0, 1.0)]


def test_history_labels_are_those_known_at_the_time():
    history = np.array([[-1, 0, 2], [0, 2, 3]])
    known = history_labels(history, LABEL, ARRIVAL, np.array([100.0, 2000.0]))
    assert known.tolist() == [[False, True, False], [True, True, False]]


def test_history_index():
    user = np.array([1, 1, 1, 2, 2])
    assert _history(user, np.arange(5.0), 2).tolist() == [[-1, -1], [-1, 0], [0, 1], [-1, -1], [-1, 3]]


@pytest.mark.parametrize("options, message", [
    ({"strategy": "eventual"}, "strategy must be one of"),
    ({"window": 0}, "'window' must be a positive finite number"),
    ({"horizon": float("inf")}, "'horizon' must be a positive finite number"),
    ({"delay": -1}, "'delay' must be a finite number >= 0"),
])
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        StreamConfig(**options)


def test_a_small_stream_end_to_end(tmp_path):
    split = split_dataset(load_dataset("synthetic:users=60,items=50,min_len=10,max_len=20,seed=1"))
    cfg = StreamConfig(strategy="first-label", window=1800.0, warmup=1, seed=0)
    a = stream_train("sasrec", split, model_options={"dim": 16, "max-len": 50}, config=cfg)
    b = stream_train("sasrec", split, model_options={"dim": 16, "max-len": 50}, config=cfg)
    assert a["auc"] == b["auc"] and 0.0 <= a["auc"] <= 1.0
    assert a["trained"] == len(split.item) == sum(w["trained"] for w in a["windows"])
    assert a["evaluated"] == sum(w.get("evaluated", 0) for w in a["windows"][1:])
    with pytest.raises(ConfigError, match="needs click labels"):
        stream_train("sasrec", split_dataset(load_dataset("seq:" + str(_seq(tmp_path)))), config=cfg)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "simulations"))
    import streaming_moment

    out = tmp_path / "out"
    assert streaming_moment.main(["--data", "synthetic:users=40,items=40,min_len=10,max_len=15,seed=2", "--seed", "0",
                                  "--strategy", "final-label", "--strategy", "fast-slow", "--set", "dim=16",
                                  "--out", str(out), "--name", "s"]) == 0
    doc = __import__("json").loads((out / "s.json").read_text())
    assert set(doc["summary"]) == {"final-label", "fast-slow"} and (out / "s.png").is_file()
    assert "| final-label |" in (out / "s.md").read_text()


def _seq(tmp_path):
    path = tmp_path / "seq.txt"
    path.write_text("1 1 2 3 4\n2 2 3 4 5\n")
    return path


def test_models_that_fit_on_the_whole_log_are_refused():
    split = split_dataset(load_dataset("synthetic:users=20,items=30,domains=2,min_len=6,max_len=8,seed=1"))
    with pytest.raises(ConfigError, match="model 'moment_cross' fits state on the whole log"):
        stream_train("moment_cross", split, model_options={"dim": 16}, config=StreamConfig())
    with pytest.raises(ConfigError, match="model 'qarm' fits state on the whole log"):
        stream_train("qarm", split, model_options={"dim": 16}, config=StreamConfig())


def test_the_script_streams_non_stationary_data_and_keeps_each_file_to_one_stream(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "simulations"))
    import json

    import streaming_moment

    out = tmp_path / "out"
    moments = "synthetic:users=40,items=30,min_len=8,max_len=12,moments=2,moment_length=1800,seed=2"
    common = ["--seed", "0", "--strategy", "first-label", "--set", "dim=8", "--out", str(out), "--name", "ns"]
    assert streaming_moment.main(["--data", moments, *common]) == 0
    doc = json.loads((out / "ns.json").read_text())
    assert doc["data"] == moments and set(doc["runs"]) == {"first-label/seed0"}
    assert 0.0 <= doc["runs"]["first-label/seed0"]["auc"] <= 1.0 and doc["runs"]["first-label/seed0"]["trained"] > 0
    assert 0 < doc["moments"]["share"] < 1 and doc["moments"]["ctr_inside"] > doc["moments"]["ctr_outside"]
    assert "of the impressions are in one of their item's moments" in (out / "ns.md").read_text()
    recorded = (out / "ns.json").read_text()
    # the stationary stream (or other settings) into the same file: refused, the file untouched
    capsys.readouterr()
    assert streaming_moment.main(["--data", moments.replace(",moments=2,moment_length=1800", ""), *common]) == 2
    assert "ns.json holds runs of another data" in capsys.readouterr().err
    assert streaming_moment.main(["--data", moments, "--horizon", "1800", *common]) == 2
    assert "holds runs of another config" in capsys.readouterr().err
    assert (out / "ns.json").read_text() == recorded
    # the same stream again: the finished pair is kept, nothing retrained
    assert streaming_moment.main(["--data", moments, *common]) == 0
    assert (out / "ns.json").read_text() == recorded
