"""Admission control for uploads: how many members' frames the coordinator reads and validates at once.

An upload in flight costs the coordinator memory while its frame arrives and is checked: gRPC's chunk messages, the
upload buffer, the copy validated and the envelope decoded from it — about five times the frame. With every member
uploading in the same second that grows with the number of members (measured: +3.4 MiB per member at 256 members,
BENCHMARKS.md). The gate bounds it: an upload holds a *slot* from before its first chunk is read until its frame is
accepted or refused, and a call that finds every slot taken waits — reading nothing, so gRPC's flow control stops its
sender after a stream window (64 KiB) — in arrival order.

A slot's holder cannot keep it by going slow: the watchdog (coordinator/watchdog.py) cancels an upload below the
minimum rate or idle too long, which frees its slot. A member (its key, over all its sessions) holds at most one
slot (a second upload of its waits for the first), so one peer costs at most one slot. A wait longer than
``wait_s`` ends in RESOURCE_EXHAUSTED with the retry hint; so does a call cancelled while it waits (the client went
away).
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from node.clock import SYSTEM_CLOCK, Clock


class UploadGate:
    """``slots`` uploads at once (≥ 1); ``enter`` waits at most ``wait_s`` seconds of ``clock`` for one."""

    def __init__(self, slots: int, wait_s: float, clock: Clock = SYSTEM_CLOCK) -> None:
        if slots < 1:
            raise ValueError(f"an upload gate needs at least one slot, got {slots}")
        self.slots, self.wait_s, self.clock = slots, wait_s, clock
        self._holders: set[str] = set()
        self._queue: deque[tuple[object, str]] = deque()  # waiting tickets, first come first served
        self._cond = threading.Condition()
        self.waited = 0  # uploads that had to wait for a slot (metrics, tests)
        self.peak_waiting = 0

    @property
    def in_use(self) -> int:
        with self._cond:
            return len(self._holders)

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    def enter(self, node_id: str, gone: threading.Event) -> bool:
        """Take a slot for ``node_id``'s upload: True once held (``leave`` must follow); False when none came free
        within ``wait_s`` or ``gone`` was set (the call ended) — the caller refuses the upload."""
        ticket = (object(), node_id)
        until = self.clock.now() + self.wait_s
        with self._cond:
            self._queue.append(ticket)
            self._cond.notify_all()
            waited = False
            try:
                while not gone.is_set():
                    if len(self._holders) < self.slots and self._next_in_line() is ticket:
                        self._holders.add(node_id)
                        self.waited += waited
                        return True
                    left = until - self.clock.now()
                    if left <= 0:
                        return False
                    waited = True
                    self.peak_waiting = max(self.peak_waiting, len(self._queue))
                    self._cond.wait(min(left, 1.0))  # woken by leave/wake; the bound re-reads the clock
                return False
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()

    def _next_in_line(self) -> tuple[object, str] | None:
        """The first waiting ticket whose member holds no slot (one that does waits for its own upload to end)."""
        return next((t for t in self._queue if t[1] not in self._holders), None)

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Block until ``predicate()`` (read under the gate's lock) holds or ``timeout_s`` passes (tests: "N calls
        wait now")."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout_s)

    def leave(self, node_id: str) -> None:
        with self._cond:
            self._holders.discard(node_id)
            self._cond.notify_all()

    def wake(self) -> None:
        """A waiting call ended (its ``gone`` event is set): let it see that now."""
        with self._cond:
            self._cond.notify_all()
