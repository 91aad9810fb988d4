"""Faults in what one peer serves, injected through its fault seam (``node.transport.dht_faults.DhtFaults``) between
real peers (a hivemind DHT + p2pd each, 127.0.0.1, port 0): a slow uplink, a stalled one, other bytes than the
peer announced, a donor that announced a snapshot it no longer has. The receiving peers' code sees only what the
network gives it."""
from __future__ import annotations

import logging
import os
from typing import Any

import pytest

from node.transport.dht import DhtTransport
from node.transport.dht_faults import DhtFaults, Stream
from node.transport.dht_frames import PIECE

from dht_harness import (NAMES, NET, ROUND_WAIT_S, collect_all, fetch_in_background, no_orphaned_p2pd,  # noqa: F401
                         offer_until_wanted, peers, setup, workers)  # (fixtures among them)

pytestmark = pytest.mark.usefixtures("no_orphaned_p2pd")


@pytest.mark.timeout(120)
def test_a_frame_slower_than_the_fetch_timeout_arrives_while_it_keeps_moving_and_a_stalled_one_is_dropped(
        caplog: pytest.LogCaptureFixture) -> None:
    """A large frame on a slow link takes longer than ``fetch_timeout_s``: a fetch is bounded by progress (each
    step within the timeout), not by a total. A stream that stops moving is cut after the timeout."""
    idle_s, pace_s = 2.0, 0.2  # 12 pieces at pace_s: 2.4 s per frame, longer than idle_s; each step well within it
    faults = {"w0": DhtFaults().pace(Stream.FRAME, pace_s), "w1": DhtFaults().pace(Stream.FRAME, pace_s),
              "w2": DhtFaults().stall(Stream.FRAME, after_pieces=1)}  # w2's serving stops after the first piece
    caplog.set_level(logging.WARNING, logger="node.transport.dht")
    with peers("run-slow", faults=faults, fetch_timeout_s=idle_s) as ts:
        frames = {t.name: bytes([i + 1]) * (12 * PIECE) for i, t in enumerate(ts)}
        for t in ts:
            t.submit(0, frames[t.name])
        results = collect_all(ts, 0)
        expected = {n: frames[n] for n in NAMES[:2]}
        for name in NAMES[:2]:
            assert results[name].committed and results[name].payloads == expected, (name, results[name].reason)
        dropped = [r.getMessage() for r in caplog.records if "dropped w2" in r.getMessage()]
        assert any("stalled" in m for m in dropped), dropped
        assert "stall frame" in faults["w2"].fired


@pytest.mark.timeout(120)
def test_a_frame_that_does_not_match_its_announcement_is_dropped_by_everyone(
        setup: tuple[Any, Any], caplog: pytest.LogCaptureFixture) -> None:
    ws = workers(setup)
    caplog.set_level(logging.WARNING, logger="node.transport.dht")
    corrupt = DhtFaults().corrupt(Stream.FRAME)  # w2 announced the hash of its frame but serves other bytes
    with peers("run-bad", faults={"w2": corrupt}) as ts:
        for w, t in zip(ws, ts):
            w.train()
            t.submit(0, w.prepare(0))
        results = collect_all(ts, 0)
        for res in results.values():
            assert res.committed, res.reason
            assert res.members == NAMES[:2]  # w2 holds its own frame, but the others' have-lists exclude it
            assert res.payloads == results[NAMES[0]].payloads
        dropped = [r.getMessage() for r in caplog.records if "dropped w2" in r.getMessage()]
        assert any("sha256 mismatch" in m for m in dropped), dropped
        assert "corrupt frame" in corrupt.fired
        reports = [w.apply(results[w.name]) for w in ws]
        assert all(rep.committed for rep in reports) and not reports[2].contributed
        assert len({w.fingerprint() for w in ws}) == 1


@pytest.mark.timeout(120)
def test_chunks_a_donor_cannot_serve_come_from_the_others() -> None:
    chunk = 64 << 10
    blob = os.urandom(12 * chunk)
    gone = DhtFaults().refuse(Stream.STATE)  # w2 announces the snapshot, then answers every chunk "not held"
    with peers("state-gone", faults={"w2": gone}) as donors:
        joiner = DhtTransport.create("state-gone", "j", donors[0].visible_maddrs(), round_wait_s=ROUND_WAIT_S,
                                     state_chunk_bytes=chunk, **NET)
        try:
            th, out = fetch_in_background(joiner, need=3, timeout_s=60, gather_s=30)  # until all three offered
            offer_until_wanted(donors, 3, blob, timeout_s=30)
            th.join(90)
            got = out["got"]
            assert got is not None and got.blob == blob
            assert got.per_donor.get(NAMES[2], 0) == 0 and got.per_donor[NAMES[0]] > 0 and got.per_donor[NAMES[1]] > 0
            assert "refuse state" in gone.fired  # it was asked, and refused
        finally:
            joiner.close()
