"""The coordinator's results for collectors: ``Collect`` waits for a round to close, then hands out its result — every
member's frame (relay) or the one aggregate frame — from memory for the last rounds, from the write-ahead record
for older ones and after a restart. A mixin of ``Rounds`` (coordinator/rounds.py), whose state and lock it shares."""
from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from coordinator.commit import held_frames
from coordinator.errors import Cancelled, NotSubmitted, ResultGone, StillOpen

log = logging.getLogger(__name__)


@dataclass
class Committed:
    round: int
    frames: dict[str, bytes]  # member name → frame, sorted; with an aggregate, b"" (members get that, not frames)
    fingerprint: str
    reason: str
    aggregate: bytes | None = None  # result "aggregate" / "compressed": the one frame every member receives
    keys: dict[str, bytes] = dataclasses.field(default_factory=dict)  # member name → its public key (frames' signers)


class Waiter:
    """A collector's wake-up: ``event`` is set when a round commits, and by ``cancel`` (the call went away)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.event.set()


RESTORED_HELD = 2  # results read back from their records that are kept in memory


class Results:
    """``collect`` and the results it serves; the attributes below are ``Rounds``'s (``restored``: the results read
    back from their records, most recent last)."""

    lock: threading.RLock
    results: "OrderedDict[int, Committed]"
    restored: "OrderedDict[int, Committed]"
    open_round: int
    store: Any

    # -- results -------------------------------------------------------------------------------------
    def collect(self, node_id: str, round_: int, wait_s: float, submitted: bool,
                waiter: Waiter | None = None) -> tuple[Committed, list[str]]:
        """Block until ``round_`` closes (≤ wait_s s); the result and the members to send (the caller's own only when not
        ``submitted``). ``waiter.cancel()`` (the caller went away) ends the wait at once: raises Cancelled."""
        wake = waiter or Waiter()
        end = self.clock() + max(0.0, wait_s)
        with self.lock:
            m = self._member(node_id)
            if round_ > self.open_round:
                raise ResultGone(f"round {round_} is not open yet (the open round is {self.open_round}); fetch the "
                                 "state")
            if round_ == self.open_round:
                self._serving()
            if (not submitted and round_ == self.open_round and node_id not in self.submitted
                    and node_id not in self.uploads and node_id not in self.observers):
                # it takes this round's result without contributing (a joiner catching up or stepping in, a node
                # that skips a round to get back in step): the round need not wait for its payload
                self.observers.add(node_id)
                log.info("[round=%d] %s observes this round: not waiting for its payload", round_, m.name)
                self._maybe_close()
            self.waiters.add(wake)
            m.transfers += 1
        try:
            while True:
                wake.event.clear()
                if wake.cancelled:
                    raise Cancelled("the collector went away")
                with self.lock:
                    m = self._member(node_id)
                    if round_ != self.open_round:
                        break
                    if submitted and node_id not in self.submitted and node_id not in self.uploads:
                        raise NotSubmitted(f"no payload from {m.name} for round {round_} is held (the coordinator "
                                           "may have restarted): submit it again", {"lowband-not-submitted": "1"})
                    remaining = end - self.clock()
                    if remaining <= 0:
                        why = self.persistence.error or self._last_reason or "waiting"
                        raise StillOpen(f"round {round_} is still open: {why}")
                wake.event.wait(timeout=min(remaining, 1.0))
        finally:
            with self.lock:
                self.waiters.discard(wake)
                if node_id in self.members:
                    self.members[node_id].transfers -= 1
        with self.lock:
            m.active_round = max(m.active_round, round_)
            result = self.results.get(round_)
            if result is None:
                result = self._restored_result(round_)
            if result.aggregate is not None:
                m.bytes_out += len(result.aggregate)
                return result, []
            # to a caller that did not submit, its own too: it may not hold the frame committed under its name
            to_send = [name for name in result.frames if name != m.name or not submitted]
            m.bytes_out += sum(len(result.frames[n]) for n in to_send)
            return result, to_send

    def _restored_result(self, round_: int) -> Committed:
        """A committed round's result from its write-ahead record (after a restart, or older than those in memory),
        read once: the last ``RESTORED_HELD`` read are kept (a record of N frames is read and hashed whole, under the
        lock; every member collecting the last round after a restart, or one asking again and again, must not make
        that a read per call). Raises ResultGone when it is no longer held."""
        cached = self.restored.get(round_)
        if cached is not None:
            self.restored.move_to_end(round_)
            return cached
        rec = self.store.record(round_) if round_ < self.open_round else None
        fingerprint = self.store.fingerprints(round_).get(round_, "") if rec is not None else ""
        if rec is None or not fingerprint:
            raise ResultGone(f"the result of round {round_} is no longer held (the run is at round "
                             f"{self.open_round}); fetch the state instead")
        # the keys that signed the frames, stored with them: a sender may have left, or another key hold its name now
        keys = rec["keys"]
        if keys is None:  # a result stored before its keys were: the names' keys (bound for good, names.py)
            keys = self._bound_keys(rec["frames"])
        frames = held_frames(dict(sorted(rec["frames"].items())), rec["aggregate"])
        result = Committed(round_, frames, fingerprint, "restored", rec["aggregate"], keys)
        self.restored[round_] = result
        while len(self.restored) > RESTORED_HELD:
            self.restored.popitem(last=False)
        return result

