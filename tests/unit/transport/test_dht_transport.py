"""DhtTransport: three peers in one process, each with its own hivemind DHT + p2pd on 127.0.0.1 (port 0, NAT
traversal off), exchanging real lowband frames peer to peer."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from typing import Any

import pytest

from node.transport.dht import DhtTransport
from node.transport.dht_frames import HaveList

from dht_harness import NAMES, NET, ROUND_WAIT_S, collect_all, peers, workers

pytestmark = pytest.mark.usefixtures("no_orphaned_p2pd")


@pytest.mark.timeout(120)
def test_three_peers_commit_every_round_and_replicas_stay_identical(setup: tuple[Any, Any]) -> None:
    ws = workers(setup)
    with peers("run-ok") as ts:
        for r in range(3):
            for w, t in zip(ws, ts):
                w.train()
                t.submit(r, w.prepare(r))
            results = collect_all(ts, r)
            first = results[NAMES[0]]
            for name, res in results.items():
                assert res.committed, res.reason
                assert res.members == NAMES
                assert res.payloads == first.payloads  # identical payload sets, same order
                assert list(res.payloads) == sorted(res.payloads)
            reports = [w.apply(results[w.name]) for w in ws]
            assert all(rep.committed and rep.contributed and not rep.rejected for rep in reports)
            assert len({w.fingerprint() for w in ws}) == 1


@pytest.mark.timeout(120)
def test_a_peer_that_crashes_before_submitting_is_left_out_after_a_bounded_wait(setup: tuple[Any, Any]) -> None:
    ws = workers(setup)
    with peers("run-crash") as ts:
        for w, t in zip(ws, ts):
            w.train()
            t.submit(0, w.prepare(0))
        first = collect_all(ts, 0)
        for w in ws:
            assert first[w.name].members == NAMES
            assert w.apply(first[w.name]).committed
        # round 1: w2 dies without a word (no leave record: its heartbeat is still "live" for a while)
        ts[2].close(announce_leave=False)
        for w, t in zip(ws[:2], ts[:2]):
            w.train()
            t.submit(1, w.prepare(1))
        start = time.monotonic()
        results = collect_all(ts[:2], 1)
        elapsed = time.monotonic() - start
        for res in results.values():
            assert res.committed, res.reason
            assert res.members == NAMES[:2]
            assert res.payloads == results[NAMES[0]].payloads
        assert elapsed < ROUND_WAIT_S + 10, f"the round took {elapsed:.1f}s"
        reports = [w.apply(results[w.name]) for w in ws[:2]]
        assert all(rep.committed and rep.contributed for rep in reports)
        assert ws[0].fingerprint() == ws[1].fingerprint()


@pytest.mark.timeout(120)
def test_a_frame_that_does_not_match_its_announcement_is_dropped_by_everyone(
        setup: tuple[Any, Any], caplog: pytest.LogCaptureFixture) -> None:
    ws = workers(setup)
    caplog.set_level(logging.WARNING, logger="node.transport.dht")
    with peers("run-bad") as ts:
        for w, t in zip(ws, ts):
            w.train()
            t.submit(0, w.prepare(0))
        # w2 announced the hash of its frame but now serves different bytes (same length)
        sha, frame = ts[2].frames.latest_own(0)
        bad = bytearray(frame)
        bad[-1] ^= 0xFF
        ts[2].frames.replace(0, sha, bytes(bad))
        results = collect_all(ts, 0)
        for res in results.values():
            assert res.committed, res.reason
            assert res.members == NAMES[:2]  # w2 holds its own frame, but the others' have-lists exclude it
            assert res.payloads == results[NAMES[0]].payloads
        dropped = [r.getMessage() for r in caplog.records if "dropped w2" in r.getMessage()]
        assert any("sha256 mismatch" in m for m in dropped), dropped
        reports = [w.apply(results[w.name]) for w in ws]
        assert all(rep.committed for rep in reports) and not reports[2].contributed
        assert len({w.fingerprint() for w in ws}) == 1


@pytest.mark.timeout(120)
def test_a_peer_that_leaves_is_not_waited_for() -> None:
    """leave() publishes a record that outlives the last heartbeat, so the others close at once."""
    with peers("run-leave") as ts:
        ts[2].leave()
        frames = {t.name: bytes([i]) * (5 << 20) for i, t in enumerate(ts[:2])}  # > 4 MiB: streamed, not unary
        for t in ts[:2]:
            t.submit(0, frames[t.name])
        start = time.monotonic()
        results = collect_all(ts[:2], 0)
        elapsed = time.monotonic() - start
        for res in results.values():
            assert res.committed and res.payloads == frames
        assert elapsed < ROUND_WAIT_S, f"waited {elapsed:.1f}s for a peer that left"


@pytest.mark.timeout(120)
def test_a_client_mode_peer_takes_part_and_an_identity_file_keeps_the_peer_id(tmp_path: Any) -> None:
    """hivemind's client mode (a peer behind NAT stores no DHT records) still exchanges frames; an identity file
    gives the same peer id on every start."""
    key = str(tmp_path / "peer.key")
    with peers("run-client") as ts:
        boot = ts[0].visible_maddrs()
        client = DhtTransport.create("run-client", "c", boot, round_wait_s=ROUND_WAIT_S, client_mode=True,
                                     identity_path=key, **NET)
        try:
            first_id = client.peer_id
            client.join()
            group = [*ts, client]
            frames = {t.name: bytes([i + 1]) * 1000 for i, t in enumerate(group)}
            for t in group:
                t.submit(0, frames[t.name])
            results = collect_all(group, 0)
            for res in results.values():
                assert res.committed and res.payloads == dict(sorted(frames.items())), res.reason
        finally:
            client.close()
        again = DhtTransport.create("run-client", "c", boot, round_wait_s=ROUND_WAIT_S, identity_path=key, **NET)
        try:
            assert again.peer_id == first_id
        finally:
            again.close()


@pytest.mark.timeout(120)
def test_a_replica_whose_reference_diverged_is_left_out_and_told_to_fetch_the_state() -> None:
    """Each frame is announced with the sender's reference fingerprint: the members holding the most common
    reference commit without the odd one, and the odd one gets state_needed instead of a result."""
    with peers("run-diverged") as ts:
        frames = {t.name: bytes([i + 1]) * 1000 for i, t in enumerate(ts)}
        for t in ts:
            t.submit(0, frames[t.name], fingerprint="ref-B" if t.name == "w2" else "ref-A")
        results = collect_all(ts, 0)
        for name in NAMES[:2]:
            res = results[name]
            assert res.committed and res.members == NAMES[:2] and not res.state_needed, res.reason
        odd = results["w2"]
        assert not odd.committed and odd.state_needed and "differs from the run's ref-A" in odd.reason


@pytest.mark.timeout(120)
def test_a_peer_that_retries_a_round_the_others_committed_applies_what_they_committed() -> None:
    """A retry submits a new frame under the same subkey; agreement is over (sender, sha256), so the retrying peer
    reduces the frames the others committed — its first frame included — not its new one."""
    with peers("run-retry") as ts:
        first = {t.name: bytes([i + 1]) * 1000 for i, t in enumerate(ts)}
        for t in ts:
            t.submit(0, first[t.name])
        committed = collect_all(ts, 0)
        assert all(r.committed and r.payloads == first for r in committed.values())
        ts[2].submit(0, b"\x77" * 1000)  # w2 lost its result (paused, say) and offers round 0 again
        again = ts[2].collect(0, 30.0)
        assert again.committed and again.payloads == first, again.reason


@pytest.mark.timeout(120)
def test_a_published_outcome_decides_the_round_for_every_peer(caplog: pytest.LogCaptureFixture) -> None:
    """Once a member published a committed outcome, every peer — members and an observer — applies exactly it;
    an observer whose reference is not the run's is told to fetch the state instead."""
    caplog.set_level(logging.INFO, logger="node.transport.dht")
    with peers("run-decided") as ts:
        frames = {t.name: bytes([i + 1]) * 1000 for i, t in enumerate(ts)}
        for t in ts:
            t.submit(0, frames[t.name], fingerprint="ref-A")
        decided = frozenset({(n, hashlib.sha256(frames[n]).hexdigest()) for n in NAMES[:2]})
        ts[0]._publish_done(0, "ref-A", True, decided)
        results = collect_all(ts, 0)
        expected = {n: frames[n] for n in NAMES[:2]}
        for name, res in results.items():
            assert res.committed and res.payloads == expected, (name, res.reason)
        assert any("decided the round without our latest frame" in r.getMessage() for r in caplog.records)
        again = ts[1].collect(0, 10.0)  # asking again gives the same answer
        assert again.committed and again.payloads == expected
        # a later round: an observer whose reference is not the run's gets state_needed, not a result
        for t in ts:
            t.submit(1, frames[t.name], fingerprint="ref-B")
        collect_all(ts, 1)
        observer = DhtTransport.create("run-decided", "late", ts[0].visible_maddrs(), round_wait_s=ROUND_WAIT_S, **NET)
        try:
            odd = observer.collect(1, 10.0, fingerprint="ref-C")
            assert not odd.committed and odd.state_needed and "differs from the run's ref-B" in odd.reason
            same = observer.collect(1, 10.0, fingerprint="ref-B")
            assert same.committed and same.payloads == dict(sorted(frames.items()))
        finally:
            observer.close()


@pytest.mark.timeout(120)
def test_conflicting_outcomes_resolve_to_the_earliest_for_every_reader() -> None:
    with peers("run-conflict") as ts:
        a = frozenset({("w0", "aa"), ("w1", "bb")})
        b = frozenset({("w0", "aa")})
        ts[1]._publish_done(3, "ref", True, b, published_at=1000.0)
        ts[0]._publish_done(3, "ref", True, a, published_at=999.0)
        ts[2]._publish_done(3, "ref", False, frozenset(), published_at=998.0)  # not committed: never the outcome
        winners = [t._outcome(3, "ref") for t in ts]
        assert all(w is not None and w.pairs == a and w.publisher == "w0" for w in winners)


@pytest.mark.timeout(120)
def test_a_sender_one_member_closed_without_is_taken_in_when_another_member_holds_it(
        caplog: pytest.LogCaptureFixture) -> None:
    """A joiner's join record can reach one member only after that member closed the round (it did not know to
    wait), while its donor waits for it. The early member learns of it from the donor's have-list group, fetches
    its frame and lists it again, so the joiner counts from its first round instead of being dropped by everyone."""
    caplog.set_level(logging.INFO, logger="node.transport.dht")
    with peers("run-late-join") as ts:
        w0, w1, w2 = ts
        w2.join(from_round=1)  # w0 does not wait for w2 in round 0 ...
        w1.state.expected[0] = {"w2"}  # ... but w1 gave it the state of round 0 and waits for its frame
        frames = {t.name: bytes([i + 1]) * 1000 for i, t in enumerate(ts)}
        for t in (w0, w1):
            t.submit(0, frames[t.name])
        results: dict[str, Any] = {}
        early = [threading.Thread(target=lambda t=t: results.__setitem__(t.name, t.collect(0, 30.0))) for t in (w0, w1)]
        for th in early:
            th.start()
        have_key = "run-late-join/round/0/have"
        until = time.monotonic() + 20
        while "w0" not in w2._read(have_key):  # w0 closed the round with {w0, w1} and listed what it holds
            assert time.monotonic() < until, "w0 published no have-list"
            time.sleep(0.05)
        assert HaveList.parse(w2._read(have_key)["w0"]).group == {"w0", "w1"}
        w2.submit(0, frames["w2"])
        results["w2"] = w2.collect(0, 30.0)
        for th in early:
            th.join(60)
        assert not any(th.is_alive() for th in early)
        for name, res in results.items():
            assert res.committed and res.payloads == frames, (name, res.reason, list(res.payloads))
        assert any("[node=w0 round=0] taking in w2" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(120)
def test_a_frame_slower_than_the_fetch_timeout_arrives_while_it_keeps_moving_and_a_stalled_one_is_dropped(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A large frame on a slow link takes longer than ``fetch_timeout_s``: a fetch is bounded by progress (each
    step within the timeout), not by a total. A stream that stops moving is cut after the timeout."""
    from node.transport import dht_frames

    idle_s, pace_s = 2.0, 0.2  # the margin is idle_s − pace_s per piece, for a loaded machine
    stalls = {"w2"}  # w2's serving stops after the first piece

    async def paced(data: bytes, writer: Any, idle: float) -> None:  # a slow uplink: a piece every pace_s
        writer.write(len(data).to_bytes(8, "big"))
        for offset in range(0, len(data), dht_frames.PIECE):
            writer.write(data[offset:offset + dht_frames.PIECE])
            await writer.drain()
            stalled = any(data == frame for name, frame in frames.items() if name in stalls)
            await asyncio.sleep(3600 if stalled and offset else pace_s)

    monkeypatch.setattr(dht_frames, "send_moving", paced)
    caplog.set_level(logging.WARNING, logger="node.transport.dht")
    with peers("run-slow") as ts:
        for t in ts:
            t.fetch_timeout_s = t.frames.fetch_timeout_s = idle_s
        frames = {t.name: bytes([i + 1]) * (12 * dht_frames.PIECE) for i, t in enumerate(ts)}  # 12 pieces: 2.4 s
        for t in ts:
            t.submit(0, frames[t.name])
        results = collect_all(ts, 0)
        expected = {n: frames[n] for n in NAMES[:2]}
        for name in NAMES[:2]:
            assert results[name].committed and results[name].payloads == expected, (name, results[name].reason)
        dropped = [r.getMessage() for r in caplog.records if "dropped w2" in r.getMessage()]
        assert any("stalled" in m for m in dropped), dropped


@pytest.mark.timeout(120)
def test_a_failed_heartbeat_read_does_not_close_the_round_without_the_live_peers() -> None:
    """A round closes early only when every live peer announced. A poll whose heartbeat read fails (a lookup
    that timed out on a lossy link) knows no live peers; it must not read as "everyone announced" and close the
    round with the first announcement alone."""
    with peers("run-failed-read") as ts:
        w0, w1, _ = ts
        ts[2].leave()
        failed = threading.Event()
        real = w0._read_many
        peers_key = "run-failed-read/peers"

        def flaky(keys: list[str]) -> list[Any]:
            out = real(keys)
            if peers_key in keys and not failed.is_set():
                failed.set()  # the first heartbeat read fails; every later one is real
                out[keys.index(peers_key)] = None
            return out

        w0._read_many = flaky  # type: ignore[method-assign]
        frames = {t.name: bytes([i + 1]) * 1000 for i, t in enumerate(ts[:2])}
        w0.submit(0, frames["w0"])
        results: dict[str, Any] = {}
        th = threading.Thread(target=lambda: results.__setitem__("w0", w0.collect(0, 30.0)))
        th.start()
        assert failed.wait(20), "w0 never polled the heartbeats"
        w1.submit(0, frames["w1"])
        results["w1"] = w1.collect(0, 30.0)
        th.join(60)
        assert not th.is_alive()
        for name, res in results.items():
            assert res.committed and res.payloads == frames, (name, res.reason, list(res.payloads))
