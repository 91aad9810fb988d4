"""The control-plane contract, run against every implementation (in-process run, gRPC coordinator, hivemind DHT):
what the daemon's round loop relies on, whoever runs the run.

1. exchange: every member gets every member's frame, keyed and ordered by sender, identically everywhere, with the
   status COMMITTED and the bytes it received;
2. agreement without a silent member: a joined member that sends nothing is left out after the round's wait, and
   all the others commit the same member set; its frame, arriving late, is left out for everyone — itself
   included — so replicas stay identical;
3. observe: a member that takes a round without contributing gets the same result, and is not waited for;
4. leave: a member that left is not waited for (the round's wait is longer than the exchange's bound here);
5. state: a joiner fetches the run's state after the last committed round, and it loads into the same replica.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Iterator

import pytest

from node.transport.messages import RoundResult, RoundStatus, StateBlob, Submission

from plane_harness import KINDS, Group

NAMES = ("a", "b", "c")
BOUND_S = 30.0


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def fast(kind: str, tmp_path: Path) -> Iterator[Group]:
    """Rounds wait 1.5 s for stragglers."""
    g = Group(kind, NAMES, tmp_path, 1.5)
    yield g
    g.close()


@pytest.fixture
def patient(kind: str, tmp_path: Path) -> Iterator[Group]:
    """Rounds wait 120 s for stragglers: far longer than any exchange below may take."""
    g = Group(kind, NAMES, tmp_path, 120.0)
    yield g
    g.close()


def at_once(calls: dict[str, Callable[[], RoundResult]], bound_s: float = BOUND_S) -> dict[str, RoundResult]:
    """Run each member's call on its own thread, as separate nodes would; bounded."""
    out: dict[str, RoundResult] = {}
    threads = [threading.Thread(target=lambda n=n, c=c: out.__setitem__(n, c())) for n, c in calls.items()]
    for th in threads:
        th.start()
    for th in threads:
        th.join(bound_s + 30)
    assert not any(th.is_alive() for th in threads), "a call into the plane did not return within its bound"
    return out


def exchange_all(g: Group, subs: dict[str, Submission], bound_s: float = BOUND_S) -> dict[str, RoundResult]:
    return at_once({n: (lambda n=n: g.planes[n].exchange(subs[n], bound_s)) for n in subs}, bound_s)


def check_agreed(results: dict[str, RoundResult], members: tuple[str, ...], frames: dict[str, bytes]) -> None:
    for name, res in results.items():
        assert res.status is RoundStatus.COMMITTED, (name, res.status, res.reason)
        assert res.members == members, (name, res.members)
        assert list(res.payloads) == sorted(res.payloads)
        assert res.payloads == {m: frames[m] for m in members}, name
        assert res.bytes_received == sum(len(frames[m]) for m in members if m != name), (name, res.bytes_received)


def test_every_member_gets_every_frame_in_sender_order(fast: Group) -> None:
    for r in range(2):
        subs = {n: fast.submission(n, r) for n in NAMES}
        results = exchange_all(fast, subs)
        check_agreed(results, NAMES, {n: s.frame for n, s in subs.items()})
        for n, w in fast.workers.items():
            assert w.apply(results[n]).contributed
        assert len({w.fingerprint() for w in fast.workers.values()}) == 1


def test_a_silent_member_is_left_out_and_its_late_frame_too(fast: Group) -> None:
    subs = {n: fast.submission(n, 0) for n in NAMES}
    frames = {n: s.frame for n, s in subs.items()}
    results = exchange_all(fast, {n: subs[n] for n in NAMES[:2]})
    check_agreed(results, NAMES[:2], frames)
    # the silent member wakes up: its frame is late, and it reduces what the others reduced
    mine = fast.planes["c"].exchange(subs["c"], BOUND_S)
    assert mine.committed and mine.members == NAMES[:2] and mine.payloads == results["a"].payloads, mine.reason
    for n, w in fast.workers.items():
        report = w.apply(results.get(n, mine))
        assert report.committed and report.contributed == (n != "c")
    assert len({w.fingerprint() for w in fast.workers.values()}) == 1


def test_a_member_that_sends_another_frame_for_a_closed_round_gets_the_committed_one(fast: Group) -> None:
    """A member that went back to an older state (or restarted) trains a round it already took part in again: its new
    frame is late, and the result holds the frame committed under its name, not the one it holds now."""
    subs = {n: fast.submission(n, 0) for n in NAMES}
    results = exchange_all(fast, subs)
    check_agreed(results, NAMES, {n: s.frame for n, s in subs.items()})
    again = fast.submission("a", 0)
    assert again.frame != subs["a"].frame
    mine = fast.planes["a"].exchange(again, BOUND_S)
    assert mine.committed and mine.members == NAMES, mine.reason
    assert mine.payloads == results["b"].payloads and mine.payloads["a"] == subs["a"].frame


def test_a_member_that_observes_a_round_gets_its_result_and_is_not_waited_for(patient: Group) -> None:
    subs = {n: patient.submission(n, 0) for n in NAMES[:2]}
    calls: dict[str, Callable[[], RoundResult]] = {
        n: (lambda n=n: patient.planes[n].exchange(subs[n], BOUND_S)) for n in NAMES[:2]}
    calls["c"] = lambda: patient.planes["c"].observe(0, BOUND_S, patient.workers["c"].fingerprint())
    results = at_once(calls)
    check_agreed(results, NAMES[:2], {n: s.frame for n, s in subs.items()})
    for n in NAMES[:2]:
        assert patient.workers[n].apply(results[n]).contributed
    assert patient.workers["c"].apply_observed(results["c"])
    assert len({w.fingerprint() for w in patient.workers.values()}) == 1


def test_a_member_that_left_is_not_waited_for(patient: Group) -> None:
    patient.planes["c"].leave("test")
    subs = {n: patient.submission(n, 0) for n in NAMES[:2]}
    check_agreed(exchange_all(patient, subs, bound_s=20.0), NAMES[:2], {n: s.frame for n, s in subs.items()})


def test_a_joiner_fetches_the_state_of_the_last_committed_round(fast: Group) -> None:
    results = exchange_all(fast, {n: fast.submission(n, 0) for n in NAMES})
    for n, w in fast.workers.items():
        assert w.apply(results[n]).committed
    fingerprint = fast.workers["a"].fingerprint()

    joiner = fast.connect("j")
    info = joiner.join(fast.identity("j"))
    assert info.first_round == 1
    got: dict[str, StateBlob | None] = {}
    th = threading.Thread(target=lambda: got.__setitem__("state", joiner.fetch_state(None, 60.0)))
    th.start()
    for _ in range(600):  # members at a round boundary offer their state (where peers serve it) while it waits
        if not th.is_alive():
            break
        for n, plane in fast.planes.items():
            w = fast.workers[n]
            plane.offer_state(w.reference.committed_rounds, w.fingerprint(), w.reference.to_bytes)
        th.join(0.1)
    assert not th.is_alive(), "the joiner got no state"
    state = got["state"]
    assert state is not None and state.committed == 1 and state.fingerprint == fingerprint
    fresh = fast.workers["a"].__class__("j", fast.cfg, fast.task, shard=info.shard, num_shards=info.num_shards)
    fresh.adopt_global_state(state.blob)
    assert fresh.fingerprint() == fingerprint and fresh.reference.committed_rounds == 1


#: planes that relay the keys members joined with (RoundResult.member_keys): every one
KEYED_KINDS = KINDS


@pytest.fixture(params=KEYED_KINDS)
def keyed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Group]:
    g = Group(request.param, NAMES, tmp_path, 1.5)
    yield g
    g.close()


def test_results_carry_the_keys_members_joined_with_and_a_frame_signed_by_another_key_never_counts(
        keyed: Group) -> None:
    """The coordinator and the in-process run refuse the forged frame on arrival; serverless peers move it (the
    transport moves bytes) and every worker refuses it against the key that writes c's records."""
    from node import wire
    from node.identity import NodeKey

    subs = {n: keyed.submission(n, 0) for n in NAMES}
    w = keyed.workers["c"]
    env = wire.unpack(subs["c"].frame, w.codec, w.spec, keyed.cfg.run_id, 0)
    forged = wire.pack(keyed.cfg.run_id, 0, "c", w.codec, w.spec, env.tensors, key=NodeKey.generate())
    subs["c"] = Submission(0, forged, "c", subs["c"].loss, subs["c"].fingerprint)
    results = exchange_all(keyed, subs)
    for name in ("a", "b"):
        res = results[name]
        assert res.committed, (name, res.reason)
        assert res.member_keys == {n: keyed.key(n).public for n in res.members}
        report = keyed.workers[name].apply(res)
        assert report.contributed and report.members == ("a", "b")
        if "c" in res.members:  # serverless
            assert "signature does not verify against the key registered for 'c'" in report.rejected["c"]
    assert keyed.workers["a"].fingerprint() == keyed.workers["b"].fingerprint()
