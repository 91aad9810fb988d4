"""Clocks for the code that decides how long to wait: the daemon, the gRPC stall watch, the DHT round waits.

Production uses ``SYSTEM_CLOCK`` (``time.monotonic`` and real waits). Tests pass a ``ManualClock``: its time moves
only when someone waits on it or the test advances it, so a test of a give-up rule, a stall or a deadline needs no
wall-clock sleep and cannot flake on a loaded machine.
"""
from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale (only differences mean anything)."""

    def sleep(self, seconds: float, stop: threading.Event | None = None) -> bool:
        """Wait ``seconds`` or until ``stop`` is set; returns whether ``stop`` is set."""


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float, stop: threading.Event | None = None) -> bool:
        if stop is None:
            time.sleep(max(0.0, seconds))
            return False
        return stop.wait(max(0.0, seconds))


class ManualClock:
    """Virtual time: ``sleep`` returns at once and moves the clock on by what was asked; ``advance`` moves it too.
    Shared by threads, it is one timeline: every wait anyone makes moves everyone's clock."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self.slept = 0.0  # total virtual seconds waited (what a test may check instead of elapsed time)

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += max(0.0, seconds)

    def sleep(self, seconds: float, stop: threading.Event | None = None) -> bool:
        if stop is not None and stop.is_set():
            return True
        with self._lock:
            self._now += max(0.0, seconds)
            self.slept += max(0.0, seconds)
        return stop is not None and stop.is_set()


SYSTEM_CLOCK = SystemClock()
