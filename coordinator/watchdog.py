"""Server-side deadlines: one thread cancels every call that outlived its bound, so no call holds a server thread
for longer than its progress justifies.

A ``Watch`` is cancelled when any of these passes (seconds on the injected clock):
- ``first_s`` after it started, before its first ``progress`` (e.g. a Collect's wait for its round, plus a margin);
- ``idle_s`` after its last ``progress`` (an upload or download that moves nothing);
- ``total_s`` after it started (unary calls);
- ``first_s + bytes moved × 8 / min_bps`` after it started (a stream kept alive by a trickle).
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from node.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)


class Watch:
    def __init__(self, dog: "Watchdog", cancel: Callable[[], None], what: str, first_s: float, idle_s: float,
                 total_s: float | None, min_bps: float | None) -> None:
        self.dog, self.cancel_call, self.what = dog, cancel, what
        self.idle_s, self.min_bps = idle_s, min_bps
        self.started = dog.clock.now()
        self.first_due = self.started + first_s
        self.idle_due: float | None = None  # set by the first progress
        self.total_due = self.started + total_s if total_s is not None else None
        self.moved = 0
        self.fired = ""  # why it was cancelled ("" while it was not)

    def restart(self, first_s: float) -> None:
        """Start the clocks again now (a call that waited for a slot before it could move anything)."""
        now = self.dog.clock.now()
        self.started, self.first_due, self.idle_due, self.moved = now, now + first_s, None, 0

    def progress(self, nbytes: int = 0) -> None:
        """A message went through (``nbytes`` of payload)."""
        self.moved += nbytes
        self.idle_due = self.dog.clock.now() + self.idle_s

    def done(self) -> None:
        self.dog._remove(self)

    def overdue(self, now: float) -> str:
        """Why the call must end now ("" if it may go on)."""
        if self.total_due is not None and now >= self.total_due:
            return f"ran {now - self.started:.0f} s, over its {self.total_due - self.started:.0f} s deadline"
        if self.idle_due is None and now >= self.first_due:
            return f"nothing moved in {now - self.started:.0f} s"
        if self.idle_due is not None and now >= self.idle_due:
            return f"nothing moved for {self.idle_s:.0f} s"
        if self.min_bps and self.idle_due is not None and now >= self.first_due + self.moved * 8 / self.min_bps:
            return (f"{self.moved} bytes in {now - self.started:.0f} s: slower than {self.min_bps / 1e6:g} Mbit/s "
                    "on average")
        return ""


class Watchdog:
    """Cancels overdue watches every ``tick_s`` seconds of ``clock``; ``close`` ends its thread. With ``start=False``
    no thread runs: a test advances a manual clock and calls ``check`` itself."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK, tick_s: float = 0.25,
                 on_fire: Callable[[Watch], None] | None = None, start: bool = True) -> None:
        self.clock, self.tick_s, self.on_fire = clock, tick_s, on_fire
        self._watches: set[Watch] = set()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rpc-watchdog", daemon=True)
        if start:
            self._thread.start()

    def watch(self, cancel: Callable[[], None], what: str, *, first_s: float, idle_s: float,
              total_s: float | None = None, min_bps: float | None = None) -> Watch:
        w = Watch(self, cancel, what, first_s, idle_s, total_s, min_bps)
        with self._lock:
            self._watches.add(w)
            self._changed.notify_all()
        return w

    def _remove(self, w: Watch) -> None:
        with self._lock:
            self._watches.discard(w)
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[int], bool], timeout_s: float) -> bool:
        """Block until ``predicate(number of watched calls)`` holds (tests: "the server holds N calls now")."""
        with self._lock:
            return self._changed.wait_for(lambda: predicate(len(self._watches)), timeout_s)

    def __len__(self) -> int:
        with self._lock:
            return len(self._watches)

    def check(self) -> list[Watch]:
        """Cancel every overdue watch now; returns them."""
        now = self.clock.now()
        with self._lock:
            fired = [w for w in self._watches if w.overdue(now)]
            for w in fired:
                w.fired = w.overdue(now)
                self._watches.discard(w)
        for w in fired:
            try:
                w.cancel_call()
            except Exception:  # a call that ended meanwhile: nothing to cancel
                log.debug("cancelling %s failed", w.what, exc_info=True)
            if self.on_fire is not None:
                self.on_fire(w)
        return fired

    def _loop(self) -> None:
        while not self.clock.sleep(self.tick_s, self._stop):
            self.check()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
