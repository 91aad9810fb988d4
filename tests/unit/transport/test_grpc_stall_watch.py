"""StallWatch: a result download is cut when it stalls, never while it keeps moving, however long it takes. Time is a
``ManualClock``: nothing here waits on or measures the wall clock."""
from __future__ import annotations

import threading

from node.clock import ManualClock
from node.transport.grpc_client import StallWatch


class FakeCall:
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> bool:
        self.cancelled.set()
        return True


def test_a_stream_that_delivers_nothing_is_cancelled_once_its_first_bound_passed() -> None:
    clock, call = ManualClock(), FakeCall()
    with StallWatch(call, first_s=30.0, idle_s=5.0, clock=clock) as watch:
        # the watch's thread waits on the manual clock, which moves on by what it waits: virtual time only
        assert call.cancelled.wait(10), "a stalled stream was never cancelled"
    assert watch.stalled and clock.now() >= 30.0


def test_a_stream_that_keeps_delivering_outlives_its_idle_bound() -> None:
    clock, call = ManualClock(), FakeCall()
    watch = StallWatch(call, first_s=5.0, idle_s=5.0, clock=clock)  # driven by hand: no thread
    for _ in range(100):  # 100 messages 4.9 s apart: 490 s, far past any single bound
        clock.advance(4.9)
        assert not watch.check()
        watch.progressed()
    assert not call.cancelled.is_set()
    clock.advance(5.0)  # then nothing for the idle bound: cancelled
    assert watch.check() and call.cancelled.is_set()


def test_after_the_stream_ended_the_watch_cancels_nothing() -> None:
    clock, call = ManualClock(), FakeCall()
    with StallWatch(call, first_s=1e9, idle_s=1e9, clock=clock) as watch:
        watch.progressed()
    assert not watch._thread.is_alive()
    clock.advance(1e10)
    assert not watch.check() and not call.cancelled.is_set()
