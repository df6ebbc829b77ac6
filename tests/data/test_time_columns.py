"""ISO 8601 time columns in ``csv:`` / ``parquet:``: parsed to seconds since the epoch (UTC),
and a column of neither numbers nor dates is one line naming file, line, column and value."""

from __future__ import annotations

import pandas as pd
import pytest

from fedrec.data import load_dataset
from fedrec.errors import DataError

DAY = 1704153600  # 2024-01-02T00:00:00Z


def test_csv_iso_dates_and_datetimes_become_utc_epoch_seconds(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("u,i,ts\n"
                    "1,10,2024-01-02\n"                 # a date: midnight UTC
                    "1,11,2024-01-02T03:04:05\n"        # no zone: UTC
                    "2,10,2024-01-02T03:04:05+02:00\n"  # a zone: 01:04:05 UTC
                    "2,11,2024-01-02 00:00:01Z\n"       # space separator, Z
                    "3,12,2024-01-02T00:00:00.5Z\n")    # fractional seconds
    f = load_dataset(f"csv:{path}?user=u&item=i&time=ts").interactions.frame
    assert f["time"].tolist() == [DAY, DAY + 11045, DAY + 3845, DAY + 1, DAY + 0.5]
    whole = tmp_path / "whole.csv"
    whole.write_text("u,i,ts\n1,10,2024-01-02\n1,11,2024-01-03T00:00\n")
    assert load_dataset(f"csv:{whole}?user=u&item=i&time=ts").interactions.frame["time"].dtype == "int64"


def test_parquet_string_and_datetime_columns(tmp_path):
    frame = pd.DataFrame({"user": [1, 1], "item": [5, 6], "time": ["2024-01-02", "2024-01-02T00:01:00Z"]})
    frame.to_parquet(tmp_path / "a.parquet")
    assert load_dataset(f"parquet:{tmp_path / 'a.parquet'}").interactions.frame["time"].tolist() == [DAY, DAY + 60]
    frame["time"] = pd.to_datetime(["2024-01-02 00:00:00", "2024-01-02 00:00:02"])  # a datetime64 column, naive: UTC
    frame.to_parquet(tmp_path / "b.parquet")
    assert load_dataset(f"parquet:{tmp_path / 'b.parquet'}").interactions.frame["time"].tolist() == [DAY, DAY + 2]


@pytest.mark.parametrize("values,line,needle", [
    (["2024-01-02", "yesterday"], 3, "expected an ISO 8601 date/time, as the column's first value"),
    (["2024-01-02", "2024-13-40"], 3, "expected an ISO 8601 date/time"),  # matches the pattern, is no date
    (["2024-01-02", "17"], 3, "expected an ISO 8601 date/time"),
    (["soon", "2024-01-02"], 2, "expected a number or an ISO 8601 date/time"),
    (["17", "2024-01-02"], 3, "expected a number"),
])
def test_bad_time_values_are_one_line(tmp_path, values, line, needle):
    path = tmp_path / "bad.csv"
    path.write_text("u,i,ts\n" + "".join(f"1,{k},{v}\n" for k, v in enumerate(values)))
    with pytest.raises(DataError, match=rf"bad.csv, line {line}, column 'ts': {needle}") as info:
        load_dataset(f"csv:{path}?user=u&item=i&time=ts")
    bad = values[line - 2]
    assert f"(got '{bad}')" in str(info.value) and "\n" not in str(info.value)
