"""The transport contract, run against every transport (in-process hub, gRPC coordinator, hivemind DHT): what
the daemon's round loop relies on, whoever moves the bytes.

1. exchange: every member gets every member's frame, keyed and ordered by sender, identically everywhere;
2. agreement without a silent member: a joined member that sends nothing is left out after the round's wait,
   and all the others commit the same member set; its frame, arriving late, is left out for everyone — itself
   included — so replicas stay identical;
3. leave: a member that left is not waited for (the round's wait is longer than the collect's bound here, so
   waiting for it would fail the round);
4. state: a joiner fetches the run's state after the last committed round, and it loads into the same replica.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from node.transport.base import RoundResult, Transport

from transport_harness import KINDS, Group

NAMES = ("a", "b", "c")
COLLECT_S = 30.0


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def group(kind: str, tmp_path: Path, round_wait_s: float, names: tuple[str, ...] = NAMES) -> Group:
    return Group(kind, names, tmp_path, round_wait_s)


@pytest.fixture
def fast(kind: str, tmp_path: Path) -> Iterator[Group]:
    """Rounds wait 1.5 s for stragglers."""
    g = group(kind, tmp_path, 1.5)
    yield g
    g.close()


@pytest.fixture
def patient(kind: str, tmp_path: Path) -> Iterator[Group]:
    """Rounds wait 120 s for stragglers: far longer than any collect() below may take."""
    g = group(kind, tmp_path, 120.0)
    yield g
    g.close()


def collect_all(ts: dict[str, Transport], round_: int, timeout_s: float = COLLECT_S) -> dict[str, RoundResult]:
    """collect() on every member at once, as separate nodes would; bounded."""
    out: dict[str, RoundResult] = {}
    threads = [threading.Thread(target=lambda n=n, t=t: out.__setitem__(n, t.collect(round_, timeout_s)))
               for n, t in ts.items()]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout_s + 30)
    assert not any(th.is_alive() for th in threads), "a collect() did not return within its bound"
    return out


def check_agreed(results: dict[str, RoundResult], members: tuple[str, ...], frames: dict[str, bytes]) -> None:
    for name, res in results.items():
        assert res.committed, (name, res.reason)
        assert res.members == members, (name, res.members)
        assert list(res.payloads) == sorted(res.payloads)
        assert res.payloads == {m: frames[m] for m in members}, name
        assert res.bytes_received == sum(len(frames[m]) for m in members if m != name), (name, res.bytes_received)


def test_every_member_gets_every_frame_in_sender_order(fast: Group) -> None:
    for r in range(2):
        frames = {n: fast.frame(n, r) for n in NAMES}
        for n, t in fast.transports.items():
            t.submit(r, frames[n])
        results = collect_all(fast.transports, r)
        check_agreed(results, NAMES, frames)
        for n, w in fast.workers.items():
            assert w.apply(results[n]).contributed
        assert len({w.fingerprint() for w in fast.workers.values()}) == 1


def test_a_silent_member_is_left_out_and_its_late_frame_too(fast: Group) -> None:
    frames = {n: fast.frame(n, 0) for n in NAMES}
    on_time = {n: fast.transports[n] for n in NAMES[:2]}
    for n, t in on_time.items():
        t.submit(0, frames[n])
    results = collect_all(on_time, 0)
    check_agreed(results, NAMES[:2], frames)
    # the silent member wakes up: its frame is late, and it reduces what the others reduced
    late = fast.transports["c"]
    late.submit(0, frames["c"])
    mine = late.collect(0, COLLECT_S)
    assert mine.committed and mine.members == NAMES[:2] and mine.payloads == results["a"].payloads, mine.reason
    for n, w in fast.workers.items():
        report = w.apply(results.get(n, mine))
        assert report.committed and report.contributed == (n != "c")
    assert len({w.fingerprint() for w in fast.workers.values()}) == 1


def test_a_member_that_left_is_not_waited_for(patient: Group) -> None:
    patient.transports["c"].leave()
    stayed = {n: patient.transports[n] for n in NAMES[:2]}
    frames = {n: patient.frame(n, 0) for n in NAMES[:2]}
    for n, t in stayed.items():
        t.submit(0, frames[n])
    check_agreed(collect_all(stayed, 0, timeout_s=20.0), NAMES[:2], frames)


def test_a_joiner_fetches_the_state_of_the_last_committed_round(fast: Group) -> None:
    frames = {n: fast.frame(n, 0) for n in NAMES}
    for n, t in fast.transports.items():
        t.submit(0, frames[n])
    results = collect_all(fast.transports, 0)
    for n, w in fast.workers.items():
        assert w.apply(results[n]).committed
    fingerprint = fast.workers["a"].fingerprint()

    joiner = fast.joiner("j")
    got: dict[str, object] = {}
    th = threading.Thread(target=lambda: got.__setitem__("state", joiner.fetch_state(60.0)))
    th.start()
    deadline = time.monotonic() + 60
    while th.is_alive():  # the members reach "round boundaries" and offer their state while the joiner waits
        assert time.monotonic() < deadline, "the joiner got no state"
        for n, t in fast.transports.items():
            w = fast.workers[n]
            t.offer_state(w.reference.committed_rounds, w.fingerprint(), w.reference.to_bytes)
        th.join(0.1)
    state = got["state"]
    assert state is not None
    committed, blob, published = state  # type: ignore[misc]
    assert committed == 1 and published == fingerprint
    fresh = fast.workers["a"].__class__("j", fast.cfg, fast.task, shard=5, num_shards=8)
    fresh.adopt_global_state(blob)
    assert fresh.fingerprint() == fingerprint and fresh.reference.committed_rounds == 1
