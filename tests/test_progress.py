"""Progress reporting: tqdm bars in a terminal, periodic log lines elsewhere."""
from __future__ import annotations

import logging

import pytest

from instseg_pipeline import progress as progress_module
from instseg_pipeline.progress import LogProgress, format_seconds, progress


@pytest.fixture
def not_a_terminal(monkeypatch):
    monkeypatch.setattr(progress_module, "interactive", lambda: False)


def test_log_lines_every_ten_percent_and_at_the_end(not_a_terminal, caplog):
    caplog.set_level(logging.INFO, logger="instseg_pipeline.progress")
    items = list(progress(range(25), desc="predict", unit="img", every_seconds=1e9))
    assert items == list(range(25))
    lines = [r.getMessage() for r in caplog.records]
    # 10% of 25 is 2.5 items: a line at 3, 6, ..., 24, then the closing one at 25
    assert [line.split()[1] for line in lines] == [f"{n}/25" for n in range(3, 25, 3)] + ["25/25"]
    assert lines[-1].startswith("predict: 25/25 img (100%)") and "ETA 0:00:00" in lines[-1]
    assert all("\r" not in line and len(line) < 120 for line in lines)


def test_manual_counter_logs_on_time_and_closes_once(not_a_terminal, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    clock = iter([0.0, 1.0, 40.0, 41.0, 41.0])
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: next(clock))
    bar = progress(total=1000, desc="images", unit="img", every_seconds=30)
    bar.update(1)    # t=1: neither 10% nor 30 s
    bar.update(1)    # t=40: 30 s passed
    bar.close()      # nothing new since the last line
    bar.close()
    assert [r.getMessage() for r in caplog.records] == [
        "images: 2/1000 img (0%) 0.05 img/s, ETA 5:32:40"]  # 998 / 0.05 s


def test_disabled_and_unknown_total(not_a_terminal, caplog):
    caplog.set_level(logging.INFO)
    assert list(progress(iter(range(3)), desc="quiet", disable=True)) == [0, 1, 2]
    assert caplog.records == []
    counter = LogProgress(None, total=None, desc="", unit="it", disable=False,
                          logger=logging.getLogger("t"), every_percent=10, every_seconds=1e9)
    counter.update(5)
    counter.close()
    assert caplog.records[-1].getMessage().startswith("5 it ")


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    from tqdm import tqdm

    monkeypatch.setattr(progress_module, "interactive", lambda: True)
    bar = progress(range(3), desc="bar", disable=True)
    assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2]


def test_format_seconds():
    assert format_seconds(3725.4) == "1:02:05"
    assert format_seconds(float("inf")) == "?" and format_seconds(float("nan")) == "?"
