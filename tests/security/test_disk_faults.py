"""An idempotent commit over real gRPC: a state dir that fills up or turns read-only mid-run (a ``Disk`` that raises
OSError, the store's seam) never applies a round twice — the coordinator reports NOT_SERVING, refuses round calls
with UNAVAILABLE and the reason, retries, and once the disk is back commits the round exactly once: every member's
replica and the coordinator's reference match an oracle that applied it once. A second coordinator on the same state
dir is refused."""
from __future__ import annotations

import errno
import threading
from pathlib import Path
from typing import Any, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2

from coordinator.errors import StartupError
from coordinator.server import CoordinatorServer
from coordinator.store import Disk
from node.proto.lowband.v1 import coordinator_pb2 as pb
from node.tasks.base import build_seeded
from node.train.reference import Reference
from security_harness import RPC_S, Health, Trial, rpc_error

WAIT_S = 30.0


class FaultyDisk(Disk):
    """A disk that raises ``fault`` (an OSError) on every write while it is set; counts the writes it refused."""

    def __init__(self) -> None:
        self.fault: OSError | None = None
        self.refused = 0
        self.changed = threading.Condition()

    def _check(self) -> None:
        with self.changed:
            if self.fault is not None:
                self.refused += 1
                self.changed.notify_all()
                raise self.fault

    def write_atomic(self, path: Path, data: bytes) -> None:
        self._check()
        super().write_atomic(path, data)

    def append_line(self, path: Path, line: str) -> None:
        self._check()
        super().append_line(path, line)

    def transaction(self, db: Any, statements: Callable[[], None]) -> None:
        self._check()
        super().transaction(db, statements)

    def wait_refused(self, n: int) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.refused >= n, WAIT_S)


@pytest.mark.parametrize("fault", [OSError(errno.ENOSPC, "No space left on device"),
                                   OSError(errno.EROFS, "Read-only file system")], ids=["full", "read-only"])
def test_a_failing_store_never_applies_a_round_twice(trial: Callable[..., Trial], fault: OSError) -> None:
    disk = FaultyDisk()
    t = trial(disk=disk)
    a, b = t.join("a"), t.join("b")
    assert t.honest_round() == 0
    health = Health(t.channel())
    health.next_status(health_pb2.HealthCheckResponse.SERVING)
    oracle = Reference.for_model(t.cfg, build_seeded(t.task, t.cfg.seed))
    oracle.load_bytes(t.core.state_blob()[1])  # the state after round 0, before the fault
    before = t.core.reference.fingerprint()

    disk.fault = fault
    frames = {n: t.frame(n, 1) for n in ("a", "b")}
    assert a.transport.submit(1, frames["a"]) == "accepted"
    assert b.transport.submit(1, frames["b"]) == "accepted"  # the round closes: its commit fails
    assert disk.wait_refused(3)  # ...and is retried, again and again
    health.next_status(health_pb2.HealthCheckResponse.NOT_SERVING)
    assert t.core.reference.fingerprint() == before and t.core.open_round == 1
    assert t.core.reference.committed_rounds == 1
    why = f"cannot persist round 1: OSError: [Errno {fault.errno}] {fault.strerror}"
    err = rpc_error(a.transport.stub.Collect, pb.CollectRequest(node_id=a.transport.node_id, round=1, wait_ms=0,
                                                                submitted=True))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and why in err.details(), err.details()
    status = t.stub().Status(pb.StatusRequest(), timeout=RPC_S)
    assert why in status.persistence_error and status.committed_rounds == 1

    disk.fault = None  # the disk is back
    health.next_status(health_pb2.HealthCheckResponse.SERVING)
    envelopes, rejected = oracle.unpack(frames, 1)
    assert not rejected
    oracle.apply(envelopes, 1)  # round 1 applied once
    for name, m in t.members.items():
        res = m.transport.collect(1, WAIT_S, own=frames[name], own_name=name)
        assert res.committed and m.worker.apply(res).committed
        assert m.worker.fingerprint() == res.reference_fingerprint == oracle.fingerprint()
    assert t.core.reference.fingerprint() == oracle.fingerprint() and t.core.reference.committed_rounds == 2
    assert [r.round for r in t.core.store.recent_rounds()] == [0, 1]
    assert t.honest_round() == 2  # and the run goes on


def test_a_second_coordinator_on_the_same_state_dir_is_refused(trial: Callable[..., Trial]) -> None:
    t = trial()
    with pytest.raises(StartupError, match=r"state dir .* is in use by another coordinator \(pid \d+\)"):
        CoordinatorServer("127.0.0.1:0", t.root / "state", t.root / "run.toml")
    t.join("a"), t.join("b")
    assert t.honest_round() == 0  # the first one was not disturbed


def test_a_restarted_coordinator_binds_the_port_it_had(trial: Callable[..., Trial]) -> None:
    t = trial()
    address = t.address
    t.server.stop(grace=0)
    again = CoordinatorServer("127.0.0.1:0", t.root / "state", t.root / "run.toml")
    again.start()
    try:
        assert again.address == address
    finally:
        again.stop(grace=0)
    t.server = CoordinatorServer("127.0.0.1:0", t.root / "state", t.root / "run.toml")  # for the fixture's stop
    t.server.start()
