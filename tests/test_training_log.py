"""log.csv of the training loop: the time spent waiting for data, and resuming older logs."""

import csv
from pathlib import Path

import pytest

from glomeruli_dataset import config_dict, make_dataset
from training.config import config_from_dict
from training.loop import _CsvLog, fit


def read_log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_data_wait_is_positive_and_within_each_logged_interval(tmp_path):
    make_dataset(tmp_path / "data")
    config = config_from_dict(config_dict(tmp_path / "data", tmp_path / "run", steps=5, log_every=2), "test")
    fit(config)  # workers=0: every patch is read inside next(loader), so waiting is never zero
    rows = read_log(tmp_path / "run" / "log.csv")
    assert [int(r["step"]) for r in rows] == [2, 4, 5]  # the last row covers one step
    for previous, row in zip([0, 2, 4], rows):
        interval_s = config.train.batch_size * (int(row["step"]) - previous) / float(row["images_per_s"])
        assert 0 < float(row["data_wait_s"]) <= interval_s * 1.02


def test_resuming_a_log_written_before_the_data_wait_column(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("step,loss,lr,images_per_s\n10,0.9,0.001,5.0\n20,0.8,0.001,5.0\n")
    _CsvLog(path, start=10).write(20, 0.7, 0.001, 5.0, 0.25)
    rows = read_log(path)
    assert [(r["step"], r["images_per_s"], r["data_wait_s"]) for r in rows] == [
        ("10", "5.0", ""), ("20", "5", "0.2500")]
    assert float(rows[1]["loss"]) == pytest.approx(0.7)
