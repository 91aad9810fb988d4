"""DhtTransport between real peers: three in one process, each with its own hivemind DHT + p2pd on 127.0.0.1
(port 0, NAT traversal off), exchanging real lowband frames peer to peer. The agreement's rules are tested without
a DHT in test_dht_agreement.py; these check that the transport runs them over real records and streams. Faults
injected into one peer's reads or serving are in tests/fault/test_dht_*.py."""
from __future__ import annotations

import logging
import os
import threading
from typing import Any

import pytest
import torch

from node import wire
from node.clock import ManualClock
from node.transport.dht import DhtTransport
from node.transport.dht_agreement import GroupKind

from dht_harness import (NAMES, NET, ROUND_WAIT_S, collect_all, eventually, fetch_in_background, offer_until_wanted,
                         peers, workers)

pytestmark = pytest.mark.usefixtures("no_orphaned_p2pd")


@pytest.mark.timeout(150)
def test_three_peers_commit_every_round_identically_and_a_retry_applies_what_was_committed(
        setup: tuple[Any, Any]) -> None:
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
        # w2 lost round 2's result (paused, say) and offers the round again with a new frame: agreement is over
        # (sender, sha256), so it gets the frames the others committed, its first one included, not its new one
        ts[2].submit(2, b"\x77" * 1000)
        again = ts[2].collect(2, 30.0)
        assert again.committed and again.payloads == results[NAMES[0]].payloads, again.reason


@pytest.mark.timeout(120)
def test_a_peer_that_leaves_is_not_waited_for_and_large_frames_stream() -> None:
    """leave() publishes a record that outlives the last heartbeat, so the others close as soon as they both
    announced. The round's wait and w2's last heartbeat (ttl 3 × heartbeat_s) both outlast the test's bound: only
    the leave record can let them close before it."""
    with peers("run-leave", round_wait_s=300.0, heartbeat_s=100.0) as ts:
        ts[2].leave()
        frames = {t.name: bytes([i]) * (5 << 20) for i, t in enumerate(ts[:2])}  # > 4 MiB: streamed, not unary
        for t in ts[:2]:
            t.submit(0, frames[t.name])
        results = collect_all(ts[:2], 0)
        for t in ts[:2]:
            res = results[t.name]
            assert res.committed and res.payloads == frames, res.reason
            closed = t.closed[0]
            assert closed.kind is GroupKind.ALL_ANNOUNCED and closed.group == NAMES[:2], closed
        assert results["w0"].bytes_received == len(frames["w1"])  # w0 pulled w1's frame, and only it


@pytest.mark.timeout(120)
def test_a_peer_that_crashed_is_waited_for_the_rounds_wait_on_the_transports_clock_then_left_out() -> None:
    """w2 dies without a word: its heartbeat stays live (for longer than the test), so the others wait the round's
    wait for it, then close without it. The waits run on a virtual clock: the round's 1000 s wait passes in
    polls of poll_s, and the clock shows it was waited in full. The agree and settle waits are far longer (in
    virtual time, which the two peers' polls advance together): only the other's have-list and outcome end them."""
    clock = ManualClock()
    with peers("run-crash", round_wait_s=1000.0, heartbeat_s=100.0, poll_s=10.0, agree_wait_s=1e6, settle_s=1e6,
               clock=clock) as ts:
        ts[2].close(announce_leave=False)
        frames = {t.name: bytes([i + 1]) * 1000 for i, t in enumerate(ts[:2])}
        for t in ts[:2]:
            t.submit(0, frames[t.name])
        results = collect_all(ts[:2], 0, timeout_s=1e7)  # virtual seconds
        for t in ts[:2]:
            assert results[t.name].committed and results[t.name].payloads == frames, results[t.name].reason
            closed = t.closed[0]
            assert closed.kind is GroupKind.WAIT_OVER and closed.missing == ("w2",), closed
            assert closed.group == ("w0", "w1") and "closing without w2 after the round's wait" in closed.reason
        assert 1000.0 <= clock.now() < 1e6  # the round's wait in full; the agree and settle waits ended early


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


@pytest.mark.timeout(150)
def test_a_joiner_one_member_closed_without_is_taken_in_because_its_donor_waits_for_it(
        caplog: pytest.LogCaptureFixture) -> None:
    """A joiner's join record can reach one member only after that member closed the round (it did not know to
    wait), while its donor waits for it. The early member learns of it from the donor's have-list group, fetches
    its frame and lists it again, so the joiner counts from its first round instead of being dropped by everyone."""
    caplog.set_level(logging.INFO, logger="node.transport.dht")
    with peers("run-late-join", round_wait_s=300.0) as ts:
        w0, w1, w2 = ts
        frames = {t.name: bytes([i + 1]) * 1000 for i, t in enumerate(ts)}
        for t in (w0, w1):  # the members announce round 0 from reference "fp" (which vouches for w1's offer) ...
            t.submit(0, frames[t.name], "fp")
        w2.join(from_round=1)  # ... w2's heartbeat, as w0 reads it: not part of round 0 (its join reached w0 late)
        th, out = fetch_in_background(w2, need=0, timeout_s=60, gather_s=0.0)
        offer_until_wanted([w1], 0, os.urandom(1000), timeout_s=30)  # ... but w1 gave it the state of round 0
        th.join(90)
        assert out["got"] is not None and out["got"].per_donor == {"w1": 1000}
        assert w1.state.expected == {0: {"w2"}} and w0.state.expected == {}
        results: dict[str, Any] = {}
        early = [threading.Thread(target=lambda t=t: results.__setitem__(t.name, t.collect(0, 60.0))) for t in (w0, w1)]
        for th in early:
            th.start()
        eventually(lambda: 0 in w0.closed, 20, "w0 closed round 0")  # without w2, which it does not expect
        assert w0.closed[0].kind is GroupKind.ALL_ANNOUNCED and w0.closed[0].group == ("w0", "w1"), w0.closed
        assert 0 not in w1.closed  # w1 waits for w2
        w2.submit(0, frames["w2"])
        results["w2"] = w2.collect(0, 60.0)
        for th in early:
            th.join(90)
        assert not any(th.is_alive() for th in early)
        for name, res in results.items():
            assert res.committed and res.payloads == frames, (name, res.reason, list(res.payloads))
        assert w1.closed[0].kind is GroupKind.ALL_ANNOUNCED and w1.closed[0].group == NAMES
        assert any("[node=w0 round=0] taking in w2" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(120)
def test_a_well_formed_frame_with_invalid_content_is_rejected_by_every_worker(
        setup: tuple[Any, Any], caplog: pytest.LogCaptureFixture) -> None:
    """The hash matches (the peer announced what it serves), but a scale is NaN: the transports deliver it, and
    every worker's validation rejects it with the same logged reason, so the replicas stay identical."""
    ws = workers(setup)
    caplog.set_level(logging.WARNING, logger="node.train.worker")
    with peers("run-nan") as ts:
        for w, t in zip(ws, ts):
            w.train()
            frame = w.prepare(0)
            if w.name == NAMES[2]:
                pending = w.pending
                assert pending is not None
                name = next(iter(pending.encoded))
                bad = {n: dict(enc) for n, enc in pending.encoded.items()}
                bad[name]["scales"] = torch.full_like(bad[name]["scales"], float("nan"))
                frame = wire.pack(w.cfg.run_id, 0, w.name, w.codec, w.spec, bad, key=w.key)  # signed: its own
            t.submit(0, frame)
        results = collect_all(ts, 0)
        for res in results.values():
            assert res.committed and res.members == NAMES  # the transport moves bytes; validation is the worker's
        reports = [w.apply(results[w.name]) for w in ws]
        for rep in reports:
            assert rep.committed and rep.members == NAMES[:2]
            assert set(rep.rejected) == {NAMES[2]} and "finite" in rep.rejected[NAMES[2]], rep.rejected
        assert len({w.fingerprint() for w in ws}) == 1
        logged = [r.getMessage() for r in caplog.records if "rejected payload from w2" in r.getMessage()]
        assert len(logged) == 3, logged
