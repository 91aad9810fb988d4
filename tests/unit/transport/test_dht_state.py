"""Serverless state transfer (``dht_state.StateShare``) and payload rejection between real DhtTransports on
127.0.0.1: a joiner downloads a snapshot in chunks from several donors, survives a donor that stops serving, and
a frame whose hash matches but whose content is invalid is rejected by every worker the same way."""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from typing import Any

import pytest
import torch

from node import wire
from node.transport.dht import DhtTransport
from node.transport.dht_state import Download

from dht_harness import NAMES, NET, ROUND_WAIT_S, collect_all, peers, workers

pytestmark = pytest.mark.usefixtures("no_orphaned_p2pd")
CHUNK = 64 << 10


def fetch_in_background(joiner: DhtTransport, need: int, timeout_s: float) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}
    th = threading.Thread(target=lambda: out.__setitem__("got", joiner.state.fetch(need, timeout_s)))
    th.start()
    return th, out


def offer_until_wanted(donors: list[DhtTransport], committed: int, blob: bytes, timeout_s: float) -> None:
    """Each donor offers at its 'round boundary' once the joiner's want record is visible to it."""
    pending = list(donors)
    deadline = time.monotonic() + timeout_s
    while pending:
        assert time.monotonic() < deadline, f"{[d.name for d in pending]} never saw the joiner's want record"
        pending = [d for d in pending if not d.state.offer(committed, "fp", lambda: blob)]
        if pending:
            time.sleep(0.05)  # polling the DHT, as a donor does once per round


@pytest.mark.timeout(120)
def test_a_joiner_fetches_the_state_in_chunks_from_every_donor() -> None:
    blob = os.urandom(20 * CHUNK + 123)  # 21 chunks, the last one short
    with peers("state-ok") as donors:
        joiner = DhtTransport.create("state-ok", "j", donors[0].visible_maddrs(), round_wait_s=ROUND_WAIT_S,
                                     state_chunk_bytes=CHUNK, **NET)
        try:
            th, out = fetch_in_background(joiner, need=5, timeout_s=60)
            offer_until_wanted(donors, 5, blob, timeout_s=30)
            th.join(90)
            got: Download = out["got"]
            assert got is not None and got.blob == blob
            assert got.offer.committed == 5 and got.offer.sha256 == hashlib.sha256(blob).hexdigest()
            assert sum(got.per_donor.values()) == len(blob)
            assert set(got.per_donor) == set(NAMES) and all(n > 0 for n in got.per_donor.values()), got.per_donor
            # the donors now wait for the joiner's frame from round 5 on, and not before
            assert all(d.state.expected.get(5) == {"j"} for d in donors)
            assert all(4 not in d.state.expected for d in donors)
        finally:
            joiner.close()


@pytest.mark.timeout(120)
def test_chunks_a_donor_cannot_serve_come_from_the_others() -> None:
    blob = os.urandom(12 * CHUNK)
    with peers("state-gone") as donors:
        joiner = DhtTransport.create("state-gone", "j", donors[0].visible_maddrs(), round_wait_s=ROUND_WAIT_S,
                                     state_chunk_bytes=CHUNK, **NET)
        try:
            th, out = fetch_in_background(joiner, need=3, timeout_s=60)
            offer_until_wanted(donors, 3, blob, timeout_s=30)
            donors[2].state._snapshots.clear()  # announced, then gone: every chunk asked of it fails
            th.join(90)
            got: Download = out["got"]
            assert got is not None and got.blob == blob
            assert got.per_donor.get(NAMES[2], 0) == 0 and got.per_donor[NAMES[0]] > 0 and got.per_donor[NAMES[1]] > 0
        finally:
            joiner.close()


@pytest.mark.timeout(120)
def test_no_state_within_the_timeout_is_none_and_old_snapshots_are_not_taken() -> None:
    with peers("state-none") as donors:
        donors[0].state._snapshots[1] = b"x" * 10  # an old snapshot announced earlier must not satisfy need=2
        donors[0]._store(donors[0].state.offer_key, donors[0].name,
                         (donors[0].peer_id, 1, 10, hashlib.sha256(b"x" * 10).hexdigest(), "fp"), time.time() + 60)
        started = time.monotonic()
        assert donors[1].state.fetch(2, timeout_s=2.0) is None
        assert time.monotonic() - started < 15


@pytest.mark.timeout(60)
def test_bad_state_requests_get_a_precise_refusal() -> None:
    from node.transport.dht_state import MAX_CHUNK, StateShare

    share = StateShare.__new__(StateShare)
    share._lock, share._snapshots = threading.Lock(), {4: b"abcdef"}
    assert share._answer([4, 0, 6]) == (b"\x00", b"abcdef")
    assert share._answer([4, 2, 2]) == (b"\x00", b"cd")
    status, text = share._answer([3, 0, 1])
    assert status == b"\x01" and b"no snapshot after 3 rounds" in text
    for bad in ([4, 0, 0], [4, -1, 2], [4, 0, MAX_CHUNK + 1]):
        status, text = share._answer(bad)
        assert status == b"\x02" and b"bad range" in text, bad
    status, text = share._answer([4, 4, 3])
    assert status == b"\x02" and b"past the snapshot" in text
    for bad in ("x", [4, 0], [4, "0", 1], None):
        assert share._answer(bad)[0] == b"\x02", bad


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
                frame = wire.pack(w.cfg.run_id, 0, w.name, w.codec, w.spec, bad)
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
