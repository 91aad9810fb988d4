"""Faults in one peer's DHT reads, injected through its fault seam (``node.transport.dht_faults.DhtFaults``), between
real peers (a hivemind DHT + p2pd each, 127.0.0.1, port 0): the peer's own code sees a lookup that failed, as on a
lossy link, and must not take it for an answer."""
from __future__ import annotations

import threading
from typing import Any

import pytest

from node.transport.dht_agreement import GroupKind
from node.transport.dht_faults import DhtFaults

from dht_harness import eventually, no_orphaned_p2pd, peers  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("no_orphaned_p2pd")


@pytest.mark.timeout(120)
def test_a_failed_heartbeat_read_does_not_close_the_round_without_the_live_peers() -> None:
    """A round closes early only when every live peer announced. A poll whose heartbeat read fails knows no live
    peers; it must not read as "everyone announced" and close the round with the first announcement alone."""
    faults = DhtFaults()
    with peers("run-failed-read", round_wait_s=300.0, faults={"w0": faults}) as ts:
        w0, w1, w2 = ts
        w2.leave()
        faults.fail_reads("run-failed-read/peers")  # w0's next heartbeat read fails; every later one is real
        frames = {t.name: bytes([i + 1]) * 1000 for i, t in enumerate(ts[:2])}
        w0.submit(0, frames["w0"])
        results: dict[str, Any] = {}
        th = threading.Thread(target=lambda: results.__setitem__("w0", w0.collect(0, 60.0)))
        th.start()
        eventually(lambda: bool(faults.fired), 20, "w0 polled the heartbeats")
        assert faults.fired == ["read run-failed-read/peers"]
        assert 0 not in w0.closed  # the failed read did not close the round on w0's announcement alone
        w1.submit(0, frames["w1"])
        results["w1"] = w1.collect(0, 60.0)
        th.join(90)
        assert not th.is_alive()
        for name, res in results.items():
            assert res.committed and res.payloads == frames, (name, res.reason, list(res.payloads))
        assert w0.closed[0].kind is GroupKind.ALL_ANNOUNCED and w0.closed[0].group == ("w0", "w1"), w0.closed
