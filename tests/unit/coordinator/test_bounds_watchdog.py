"""The coordinator's small guards on a fake clock: field bounds (JSON depth before parsing, log-safe text), the
replay cache, rate-limited warnings, and the watchdog's server-side deadlines."""
from __future__ import annotations

import logging

import pytest

from coordinator.bounds import RateLimited, ReplayCache, json_depth, printable
from coordinator.watchdog import Watchdog
from node.clock import ManualClock


def test_json_depth_counts_nesting_outside_strings_and_stops_past_the_limit() -> None:
    assert json_depth('{"a": [1, {"b": 2}]}', 16) == 3
    assert json_depth('{"a": "[[[[[[[[[[[[[[[[[[[[", "b": "\\"[["}', 16) == 1
    assert json_depth("[" * 1_000_000, 16) == 17  # stops right past the limit: no million-deep walk
    assert json_depth("", 16) == 0


def test_printable_escapes_newlines_and_terminal_escapes_and_bounds_the_length() -> None:
    assert printable("n1\nINFO forged") == "n1\\nINFO forged"
    assert printable("\x1b[31mred") == "\\x1b[31mred"
    assert printable("x" * 300, 10) == "x" * 10 + "…"


def test_a_signature_is_accepted_once_within_the_window() -> None:
    cache = ReplayCache(window_s=120.0, size=3)
    assert not cache.seen(b"s1", 0.0) and cache.seen(b"s1", 1.0)
    for i in range(2, 6):
        assert not cache.seen(f"s{i}".encode(), 2.0)
    assert not cache.seen(b"s1", 3.0)  # fell out of the bounded cache (the timestamp window refuses it anyway)
    assert not cache.seen(b"old", 0.0) and not cache.seen(b"old", 500.0)  # expired past the window


def test_repeated_warnings_are_rate_limited_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    warn = RateLimited(logging.getLogger("t"), every_s=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "t"):
        for i in range(5):
            now[0] = float(i)
            warn.warning("k", "refused %d", i)
        now[0] = 61.0
        warn.warning("k", "refused %d", 61)
        warn.warning("other", "another key")
    assert [r.getMessage() for r in caplog.records] == [
        "refused 0", "refused 61 (4 more like it in the last 60 s not shown)", "another key"]


def test_the_watchdog_cancels_calls_that_stall_trickle_or_overrun() -> None:
    clock = ManualClock()
    dog = Watchdog(clock, start=False)
    cancelled: list[str] = []
    unary = dog.watch(lambda: cancelled.append("unary"), "unary", first_s=30.0, idle_s=30.0, total_s=30.0)
    stream = dog.watch(lambda: cancelled.append("stream"), "stream", first_s=10.0, idle_s=5.0, min_bps=8e6)
    trickle = dog.watch(lambda: cancelled.append("trickle"), "trickle", first_s=10.0, idle_s=5.0, min_bps=8e6)
    clock.advance(4.0)
    stream.progress(8_000_000)  # 1 s worth at 8 Mbit/s
    trickle.progress(1000)
    assert dog.check() == []
    for _ in range(4):  # the stream keeps moving; the trickle moves too, but far below 8 Mbit/s
        clock.advance(4.0)
        stream.progress(8_000_000)
        trickle.progress(1000)
        dog.check()
    assert cancelled == ["trickle"]
    assert "slower than 8 Mbit/s" in trickle.fired
    clock.advance(10.0)
    dog.check()
    assert sorted(cancelled) == ["stream", "trickle", "unary"]
    assert unary.fired.startswith("ran") and stream.fired == "nothing moved for 5 s"
    unary.done(), stream.done(), trickle.done()
    assert len(dog) == 0
    dog.close()
