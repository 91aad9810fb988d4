"""StallWatch: a result download is cut when it stalls, never while it keeps moving, however long it takes."""
from __future__ import annotations

import threading
import time

from node.transport.grpc_client import StallWatch


class FakeCall:
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> bool:
        self.cancelled.set()
        return True


def test_a_stream_that_delivers_nothing_is_cancelled() -> None:
    call = FakeCall()
    with StallWatch(call, first_s=0.1, idle_s=0.1) as watch:
        assert call.cancelled.wait(10), "a stalled stream was never cancelled"
    assert watch.stalled


def test_a_stream_that_keeps_delivering_outlives_its_idle_bound() -> None:
    call = FakeCall()
    idle_s = 2.0
    with StallWatch(call, first_s=idle_s, idle_s=idle_s) as watch:
        end = time.monotonic() + 2 * idle_s  # twice the bound, with a message every 50 ms
        while time.monotonic() < end:
            watch.progressed()
            assert not call.cancelled.wait(0.05)
    assert not watch.stalled and not call.cancelled.is_set()
    # after the stream ended the watch is gone: nothing cancels the finished call later
    assert not call.cancelled.wait(idle_s + 0.5)
