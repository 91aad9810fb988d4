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


class _Ticket:
    """One call waiting at the gate: ``wake`` is set when it is granted a slot (or by its call's end)."""

    __slots__ = ("member", "wake", "granted")

    def __init__(self, member: str, wake: threading.Event) -> None:
        self.member, self.wake, self.granted = member, wake, False


class UploadGate:
    """``slots`` uploads at once (≥ 1); ``enter`` waits at most ``wait_s`` seconds of ``clock`` for one. A slot that
    comes free wakes only the call it goes to (a round of N uploads costs O(N) wake-ups, not O(N²))."""

    def __init__(self, slots: int, wait_s: float, clock: Clock = SYSTEM_CLOCK) -> None:
        if slots < 1:
            raise ValueError(f"an upload gate needs at least one slot, got {slots}")
        self.slots, self.wait_s, self.clock = slots, wait_s, clock
        self._holders: set[str] = set()
        self._queue: deque[_Ticket] = deque()  # waiting calls, first come first served
        self._lock = threading.RLock()  # re-entrant: ``wait_until``'s predicate reads the properties
        self._changed = threading.Condition(self._lock)  # tests wait on it (``wait_until``)
        self.waited = 0  # uploads that had to wait for a slot (metrics, tests)
        self.peak_waiting = 0

    @property
    def in_use(self) -> int:
        with self._lock:
            return len(self._holders)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._queue)

    def enter(self, member: str, wake: threading.Event, gone: Callable[[], bool]) -> bool:
        """Take a slot for an upload of ``member`` (its key: every session of it): True once held (``leave`` must
        follow); False when none came free within ``wait_s`` or ``gone()`` (the call ended; its end must set
        ``wake``) — the caller refuses the upload. ``wake``: this call's own event (the gate sets it when it grants
        the slot)."""
        ticket = _Ticket(member, wake)
        until = self.clock.now() + self.wait_s
        waited = False
        with self._lock:
            self._queue.append(ticket)
            self._grant()
            if not ticket.granted:
                self.peak_waiting = max(self.peak_waiting, len(self._queue))
            self._changed.notify_all()
        while True:
            with self._lock:
                if ticket.granted:
                    self.waited += waited
                    return True
                if gone() or self.clock.now() >= until:
                    self._queue.remove(ticket)
                    self._changed.notify_all()
                    return False
                wake.clear()  # under the lock: a grant sets it under the lock too, so none is lost
            if gone():  # the call ended between the check and the clear: its wake may be cleared
                continue
            waited = True
            wake.wait(max(0.0, min(until - self.clock.now(), 1.0)))  # 1 s: the bound re-reads the clock

    def _grant(self) -> None:
        """Give free slots to the first waiting calls whose member holds none (holding the lock)."""
        while len(self._holders) < self.slots:
            ticket = next((t for t in self._queue if t.member not in self._holders), None)
            if ticket is None:
                return
            self._queue.remove(ticket)
            self._holders.add(ticket.member)
            ticket.granted = True
            ticket.wake.set()

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Block until ``predicate()`` (read under the gate's lock) holds or ``timeout_s`` passes (tests: "N calls
        wait now")."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout_s)

    def leave(self, member: str) -> None:
        with self._lock:
            self._holders.discard(member)
            self._grant()
            self._changed.notify_all()
