"""Serverless state transfer (``dht_state.StateShare``) between real DhtTransports on 127.0.0.1: a joiner downloads
a snapshot in chunks from several donors, and gives up at its timeout rather than take an older state; a donor's
answers to chunk requests are precise. A donor that stops serving is in tests/fault/test_dht_serving_faults.py."""
from __future__ import annotations

import hashlib
import os

import pytest

from node.clock import ManualClock
from node.transport.dht import DhtTransport
from node.transport.dht_state import MAX_CHUNK, Download, answer_chunk

from dht_harness import NAMES, NET, ROUND_WAIT_S, fetch_in_background, offer_until_wanted, peers

pytestmark = pytest.mark.usefixtures("no_orphaned_p2pd")
CHUNK = 64 << 10


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
            assert all(d.state.expected == {5: {"j"}} for d in donors)
        finally:
            joiner.close()


@pytest.mark.timeout(120)
def test_no_state_within_the_timeout_is_none_and_an_older_snapshot_is_not_taken() -> None:
    """The joiner's waits run on its clock: a virtual one here, so giving up at the timeout takes no wall time,
    and the clock shows the joiner waited the whole timeout for a new enough state (it did not fail early)."""
    old = b"x" * 10
    with peers("state-none") as donors:
        for donor in donors:  # announced for an earlier joiner, by every member (one alone is not taken)
            assert donor.state.offer(1, "fp", lambda: old, wants={"j": -1})
        clock = ManualClock()
        joiner = DhtTransport.create("state-none", "j", donors[0].visible_maddrs(), round_wait_s=ROUND_WAIT_S,
                                     clock=clock, **NET)
        try:
            assert list(joiner.state.offers(1)[0]) and not joiner.state.offers(2)[0]  # it sees the old offer
            assert joiner.state.fetch(2, timeout_s=2.0) is None
            assert 2.0 <= clock.now() < 3.0  # the whole timeout, in polls of poll_s × 4
        finally:
            joiner.close()


def test_bad_state_requests_get_a_precise_refusal() -> None:
    snapshots = {4: b"abcdef"}
    assert answer_chunk(snapshots, [4, 0, 6]) == (b"\x00", b"abcdef")
    assert answer_chunk(snapshots, [4, 2, 2]) == (b"\x00", b"cd")
    status, text = answer_chunk(snapshots, [3, 0, 1])
    assert status == b"\x01" and b"no snapshot after 3 rounds" in text
    for bad in ([4, 0, 0], [4, -1, 2], [4, 0, MAX_CHUNK + 1]):
        status, text = answer_chunk(snapshots, bad)
        assert status == b"\x02" and b"bad range" in text, bad
    status, text = answer_chunk(snapshots, [4, 4, 3])
    assert status == b"\x02" and b"past the snapshot" in text
    for junk in ("x", [4, 0], [4, "0", 1], None):
        status, text = answer_chunk(snapshots, junk)
        assert status == b"\x02" and b"must be [committed, offset, length] integers" in text, junk
