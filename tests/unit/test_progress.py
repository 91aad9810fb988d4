"""Progress lines of long work (no terminal here: lines with rate and ETA, not a bar)."""
from __future__ import annotations

import logging

import pytest

from node.progress import Progress, duration, progress_iter


def test_a_line_says_how_much_how_fast_and_how_long_still() -> None:
    p = Progress("state download", 200e6, tty=False)
    p.done = 50e6
    line = p.line(now=p.started + 10.0)  # 5 MB/s: 30 s left
    assert line == "state download: 50.0 MB of 200.0 MB (25%), 5.0 MB/s, eta 30s"
    assert duration(3725) == "1h02m" and duration(65) == "1m05s" and duration(-1) == "0s"


def test_items_get_a_line_each_with_an_eta(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lowband.progress"):
        assert list(progress_iter(["a", "b", "c"], "bench x")) == ["a", "b", "c"]
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines] == ["bench x: 1 runs of 3 runs (33%)", "bench x: 2 runs of 3 runs (67%)"]
    assert all("eta" in line for line in lines)


def test_the_demo_line_ends_with_the_runs_eta() -> None:
    import math

    from node.demo import eta, round_line
    from node.roundlog import RoundRow

    assert eta(100.0, 3, 12, now=130.0) == "1m30s"  # 10 s a round, 9 to go
    assert eta(100.0, 0, 12, now=130.0) == "?" and eta(100.0, 12, 12, now=130.0) == "0s"
    row = RoundRow(2, 0.0, ["a"], "", "f", 10, 0, 0.5, 3.0, math.nan)
    assert round_line(row, 12, "1m30s").endswith("(0.50 s to close) eta 1m30s")
