"""The idempotent commit on a real filesystem, as the issue reproduced it: the state dir is a 7 MB tmpfs that fills
up mid-run (another file takes all but about one round's write-ahead record). Rounds commit until it is full; then the coordinator is NOT_SERVING, refuses round calls with the
reason and never applies the round; once the tmpfs is remounted larger, the round commits exactly once and every
replica matches. Needs to mount a tmpfs (root): skipped otherwise, with the reason."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2

from node.proto.lowband.v1 import coordinator_pb2 as pb
from security_harness import Health, Trial, rpc_error

WAIT_S = 30.0


def _mount(path: Path, options: str) -> str:
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True,
                         timeout=30)
    return out.stderr.strip() if out.returncode else ""


@pytest.fixture
def small_state_dir(tmp_path: Path):
    state = tmp_path / "run" / "state"
    state.mkdir(parents=True)
    problem = _mount(state, "size=7m")
    if problem:
        pytest.skip(f"cannot mount a tmpfs here: {problem}")
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], capture_output=True, timeout=30)


def test_a_state_dir_that_fills_up_never_applies_a_round_twice(small_state_dir: Path,
                                                               trial: Callable[..., Trial]) -> None:
    t = trial("run")
    assert t.core.store.dir == small_state_dir
    a, b = t.join("a"), t.join("b")
    health = Health(t.channel())
    health.next_status(health_pb2.HealthCheckResponse.SERVING)
    for _ in range(20):
        r = t.core.open_round
        if r == 1:
            # a round writes only its write-ahead record (its frames; the state goes to a snapshot every
            # rounds.snapshot_every rounds): something else fills the disk, leaving room for about one more record
            record = max(p.stat().st_size for p in small_state_dir.glob("result-*.msgpack"))
            free = os.statvfs(small_state_dir).f_bavail * os.statvfs(small_state_dir).f_frsize
            (small_state_dir / "filler").write_bytes(b"\0" * max(0, free - record * 3 // 2))
        before = t.core.reference.fingerprint()
        frames = {n: t.frame(n, r) for n in ("a", "b")}
        assert a.transport.submit(r, frames["a"]) == "accepted"
        assert b.transport.submit(r, frames["b"]) == "accepted"
        if not t.core.persistence.ok:
            break
        for name, m in t.members.items():
            res = m.transport.collect(r, WAIT_S, own=frames[name], own_name=name)
            assert res.committed and m.worker.apply(res).committed
    else:
        raise AssertionError("the 7 MB state dir never filled up")
    assert r >= 1, "not even one round fitted"
    health.next_status(health_pb2.HealthCheckResponse.NOT_SERVING)
    assert t.core.reference.fingerprint() == before and t.core.open_round == r  # nothing applied
    err = rpc_error(a.transport.stub.Collect, pb.CollectRequest(node_id=a.transport.node_id, round=r, wait_ms=0,
                                                                submitted=True))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and f"cannot persist round {r}" in err.details()
    assert "No space left on device" in err.details() or "full" in err.details(), err.details()

    problem = subprocess.run(["mount", "-o", "remount,size=64m", str(small_state_dir)], capture_output=True,
                             text=True, timeout=30)
    assert problem.returncode == 0, problem.stderr
    health.next_status(health_pb2.HealthCheckResponse.SERVING)
    fingerprints = set()
    for name, m in t.members.items():
        res = m.transport.collect(r, WAIT_S, own=frames[name], own_name=name)
        assert res.committed and m.worker.apply(res).committed
        fingerprints.add(m.worker.fingerprint())
    assert fingerprints == {t.core.reference.fingerprint()} and t.core.reference.committed_rounds == r + 1
    assert [row.round for row in t.core.store.recent_rounds()] == list(range(r + 1))
    assert t.honest_round() == r + 1
