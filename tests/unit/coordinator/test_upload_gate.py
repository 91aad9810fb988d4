"""The upload gate's admission rules on its own: slots, arrival order, one slot per member, a bounded wait, and a
waiter whose call ended leaving at once."""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from coordinator.upload_gate import UploadGate

WAIT_S = 20.0


class Call:
    """A call at the gate, as the guard makes one: its wake-up event, set by a grant or by the call's end."""

    def __init__(self) -> None:
        self.ended, self.wake = threading.Event(), threading.Event()

    def end(self) -> None:
        self.ended.set()
        self.wake.set()


def enter(gate: UploadGate, name: str, call: Call | None = None) -> bool:
    call = call or Call()
    return gate.enter(name, call.wake, call.ended.is_set)


def waiting(gate: UploadGate, n: int) -> None:
    """Block until ``n`` calls wait at the gate."""
    assert gate.wait_until(lambda: gate.waiting == n, WAIT_S), (gate.waiting, n)


def test_at_most_slots_uploads_hold_the_gate_and_the_rest_go_in_arrival_order() -> None:
    gate = UploadGate(2, wait_s=WAIT_S)
    assert enter(gate, "a") and enter(gate, "b")
    order: list[str] = []
    with ThreadPoolExecutor(3) as pool:
        futures: list[Future[bool]] = []
        for i, name in enumerate(("c", "d", "e")):
            futures.append(pool.submit(lambda n=name: enter(gate, n) and not order.append(n)))
            waiting(gate, i + 1)
        assert gate.in_use == 2 and not any(f.done() for f in futures)
        gate.leave("a")
        assert futures[0].result(WAIT_S) and order == ["c"]
        gate.leave("b")
        assert futures[1].result(WAIT_S) and order == ["c", "d"]
        assert not futures[2].done()
        gate.leave("c")
        assert futures[2].result(WAIT_S) and order == ["c", "d", "e"]
    assert gate.waited == 3 and gate.peak_waiting == 3


def test_a_member_holds_one_slot_its_second_upload_waits_and_lets_others_past() -> None:
    gate = UploadGate(2, wait_s=WAIT_S)
    assert enter(gate, "a")
    with ThreadPoolExecutor(1) as pool:
        second = pool.submit(enter, gate, "a")
        waiting(gate, 1)
        assert enter(gate, "b")  # a free slot, and the head of the line is a's own second upload: b goes past
        assert not second.done()
        gate.leave("b")
        assert not second.done()  # still a's first upload
        gate.leave("a")
        assert second.result(WAIT_S)


def test_a_wait_is_bounded_and_a_call_that_ended_stops_waiting() -> None:
    gate = UploadGate(1, wait_s=0.2)
    assert enter(gate, "a")
    assert not enter(gate, "b")  # no slot came free within wait_s
    long_gate = UploadGate(1, wait_s=WAIT_S)
    assert enter(long_gate, "a")
    call = Call()
    with ThreadPoolExecutor(1) as pool:
        f = pool.submit(enter, long_gate, "b", call)
        waiting(long_gate, 1)
        call.end()
        assert f.result(WAIT_S) is False
    assert long_gate.waiting == 0 and long_gate.in_use == 1


def test_a_gate_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        UploadGate(0, wait_s=1.0)
