"""Adversarial review (adv-today): a FetchState that waits for a snapshot (``min_committed_rounds`` above the newest
one, coordinator/snapshot.py ``Snapshotter.for_joiner``) against a member that keeps asking while the snapshot is
written. A real coordinator (tests/security/security_harness.py) over a disk whose snapshot writes stall until the
test lets them go (the store's ``Disk`` seam).

- ``test_cancelled_state_waits_do_not_hold_the_servers_threads`` — the finding, fixed: the wait for the snapshot
  ignored the call going away. The watchdog cancels a FetchState that sends nothing for ``idle_stream_s`` and the
  member's slots are freed, but the handler thread stayed in the wait (up to 600 s, or until the snapshot ends); a
  member asking again and again (any member may now ask for a snapshot of the newest round, every round) held one
  more server thread per call, until none was left for anyone: the coordinator stopped answering every node. Now a
  cancelled call's wait ends at once (coordinator/core.py ``fetch_state`` takes the servicer's ``Waiter``, as Collect
  does).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import IO, Any

import grpc

from coordinator.guard import ServerLimits
from coordinator.store import Disk
from node.proto.lowband.v1 import coordinator_pb2 as pb
from security_harness import RPC_S, Trial

HUGE = 2**64 - 1
LIMITS = ServerLimits(idle_stream_s=0.5, per_member_rpcs=4)
MAX_NODES = 2


class StallingDisk(Disk):
    """Snapshot data writes wait for ``release`` once ``armed`` is set (a slow disk, or a very large state)."""

    def __init__(self) -> None:
        self.armed = threading.Event()
        self.release = threading.Event()

    def pwrite(self, f: IO[bytes], data: bytes | memoryview, offset: int) -> None:
        if self.armed.is_set():
            self.release.wait(120)
        super().pwrite(f, data, offset)


def _ask(stub: Any, node_id: str, calls: int) -> list[str]:
    """``calls`` FetchStates one after the other, each cut by the coordinator's watchdog; their status codes."""
    codes = []
    for _ in range(calls):
        try:
            for _ in stub.FetchState(pb.FetchStateRequest(node_id=node_id, min_committed_rounds=HUGE),
                                     timeout=RPC_S):
                pass
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name)
    return codes


def test_cancelled_state_waits_do_not_hold_the_servers_threads(tmp_path: Path) -> None:
    disk = StallingDisk()
    trial = Trial(tmp_path / "run", limits=LIMITS, disk=disk, membership={"max_nodes": MAX_NODES},
                  rounds={"snapshot_every": 100})
    try:
        trial.join("a")
        attacker = trial.join("b")
        trial.honest_round()
        trial.core.snapshots.wait()
        disk.armed.set()  # from here, a snapshot takes as long as the test says
        workers = LIMITS.workers(MAX_NODES)
        per_thread = workers // LIMITS.per_member_rpcs + 1
        codes: list[list[str]] = []
        threads = [threading.Thread(target=lambda: codes.append(_ask(attacker.transport.stub, attacker.transport.node_id,
                                                                      per_thread)))
                   for _ in range(LIMITS.per_member_rpcs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(c != "OK" for cs in codes for c in cs)  # every one was cut: the snapshot never ended
        # an honest member's call still gets a thread
        status = trial.stub().Status(pb.StatusRequest(read_token=trial.token), timeout=5.0)
        assert status.committed_rounds == 1
    finally:
        disk.armed.clear()
        disk.release.set()
        trial.core.snapshots.wait(60)  # the snapshot ends before the store closes
        trial.close()
