"""RateLimited (node/logutil.py): a repeated warning is logged once per interval per key, and the next line says how
many were held back."""
from __future__ import annotations

import logging

import pytest

from node.logutil import RateLimited


def test_a_repeated_warning_is_logged_once_per_interval_per_key(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    limited = RateLimited(logging.getLogger("test.logutil"), every_s=10.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="test.logutil")
    shown = [limited.warning("submit", "submit round %d failed", r) for r in range(5)]
    assert shown == [True, False, False, False, False]
    assert limited.warning("collect", "collect failed")  # another key: its own interval
    now[0] += 10.0
    assert limited.warning("submit", "submit round %d failed", 5)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["submit round 0 failed", "collect failed",
                     "submit round 5 failed (4 more like it in the last 10 s not shown)"]
    now[0] += 10.0
    assert limited.warning("submit", "submit round %d failed", 6)
    assert caplog.records[-1].getMessage() == "submit round 6 failed"
