"""The write-ahead log, snapshots and replay (coordinator/store.py, snapshot.py, replay.py), driven through the store's
``Disk`` seam and the fake clock: a crash before or after the commit point at each write — the write-ahead record,
the row, the fingerprint, the snapshot's data, its rename — restarts at the right round with the right fingerprint;
a record written for a round that never committed is cut; a snapshot taken while rounds commit holds exactly its
round; a restart replays to the fingerprint every row recorded; a state dir of the format before the log loads;
a joiner downloads a snapshot and catches up from the rounds kept after it.

A *crash* here: the disk raises (or the test stops) mid-way, the snapshot thread is let finish or fail, and the store
is closed without ``core.close()`` (which would snapshot the last round), then a new core starts on the same dir."""
from __future__ import annotations

import errno
import threading
from pathlib import Path
from typing import Any, Callable

import msgpack
import pytest
import torch
from safetensors import safe_open

from core_harness import Clock, Harness
from coordinator.replay import ReplayError
from coordinator.store import Disk, Store
from node import wire
from node.train import state_file
from node.train.reference import Reference
from node.transport.messages import RoundResult, RoundStatus


class CrashDisk(Disk):
    """Raises ENOSPC at the write named by ``fail`` ("wal", "row", "fingerprint", "snapshot-data", "freeze-write",
    "snapshot-rename"), once armed; ``stall``: the snapshot writer waits in its ``stall``-th data write until a
    commit waits to freeze the snapshot (so the commit lands while the snapshot runs)."""

    def __init__(self) -> None:
        self.fail = ""
        self.failed = 0
        self.transactions = 0
        self.stall: int | None = None
        self.core: Any = None
        self.writes: list[tuple[str, int]] = []  # (thread name, offset) of each snapshot data write

    def _boom(self, what: str) -> None:
        if self.fail == what:
            self.failed += 1
            raise OSError(errno.ENOSPC, f"No space left on device ({what})")

    def write_atomic(self, path: Path, data: bytes) -> None:
        if path.name.startswith("result-"):
            self._boom("wal")
        super().write_atomic(path, data)

    def transaction(self, db: Any, statements: Callable[[], None]) -> None:
        # a round's row is the transaction that inserts it; its fingerprint is the next one
        self.transactions += 1
        if self.fail in ("row", "fingerprint"):
            self._boom(self.fail if self.transactions == (1 if self.fail == "row" else 2) else "")
        super().transaction(db, statements)

    def pwrite(self, f: Any, data: bytes | memoryview, offset: int) -> None:
        if offset > 0:
            name = threading.current_thread().name
            self.writes.append((name, offset))
            if name == "lowband-snapshot" and self.stall is not None and len(self.writes) == self.stall:
                assert self.core.snapshots.current.freezing.wait(60), "the commit never reached freeze"
            self._boom("snapshot-data")
            if name != "lowband-snapshot":
                self._boom("freeze-write")  # a tensor the committing thread writes into a running snapshot
        super().pwrite(f, data, offset)

    def publish(self, f: Any, path: Path) -> None:
        self._boom("snapshot-rename")
        super().publish(f, path)

    def arm(self, what: str) -> None:
        self.fail, self.transactions = what, 0


def crash(h: Harness) -> None:
    h.core.snapshots.wait()
    h.store.close()


def round_(h: Harness, workers: dict[str, Any], r: int) -> dict[str, bytes]:
    frames = {}
    for name, w in workers.items():
        w.train()
        frames[name] = w.prepare(r)
        h.submit(name, r, frames[name])
    return frames


def start(tmp_path: Path, clock: Clock, disk: Disk | None = None, every: int = 3,
          extra: dict[str, Any] | None = None) -> Harness:
    h = Harness(tmp_path / "state", clock, {"rounds": {"snapshot_every": every, **(extra or {})}}, disk=disk)
    if isinstance(disk, CrashDisk):
        disk.core = h.core
    return h


def members(h: Harness) -> dict[str, Any]:
    return {n: h.worker(n, h.join(n)) for n in ("a", "b")}


def restart(tmp_path: Path, clock: Clock, old: Harness, every: int = 3) -> Harness:
    h = start(tmp_path, clock, every=every)
    h.ids, h.keys = dict(old.ids), old.keys
    return h


def oracle_of(h: Harness) -> Reference:
    return Reference.for_model(h.cfg.run, h.core.task.build_model(h.cfg.run.seed))


@pytest.mark.parametrize("fail, committed", [("wal", 1), ("row", 1), ("fingerprint", 2)])
def test_a_crash_at_each_write_of_a_commit_restarts_at_the_right_round(tmp_path: Path, clock: Clock, fail: str,
                                                                       committed: int) -> None:
    """Before the commit point (the record, the row) the round is not committed: the restart is at round 1, and a
    record renamed before the row failed is cut, never replayed. After it (the fingerprint's write failed, then the
    process died) the round is committed: the replay recomputes it and fills in the row's fingerprint."""
    disk = CrashDisk()
    h1 = start(tmp_path, clock, disk)
    workers = members(h1)
    round_(h1, workers, 0)
    fps = [h1.core.reference.fingerprint()]
    disk.arm(fail)
    round_(h1, workers, 1)
    assert disk.failed == 1
    fps.append(h1.core.reference.fingerprint())
    if fail != "fingerprint":
        assert h1.core.open_round == 1 and not h1.core.persistence.ok  # the round stays open with its payloads
    crash(h1)
    h2 = restart(tmp_path, clock, h1)
    try:
        assert h2.core.reference.committed_rounds == committed
        assert h2.core.reference.fingerprint() == fps[committed - 1]
        assert h2.store.fingerprints(0) == {r: fps[r] for r in range(committed)}  # filled in by the replay
        assert sorted(p.name for p in h2.store.dir.glob("result-*")) == [f"result-{r:08d}.msgpack"
                                                                         for r in range(committed)]
    finally:
        h2.close()


@pytest.mark.parametrize("fail", ["snapshot-data", "snapshot-rename"])
def test_a_failed_snapshot_leaves_no_file_and_the_restart_replays_from_the_seed(tmp_path: Path, clock: Clock,
                                                                               fail: str) -> None:
    disk = CrashDisk()
    h1 = start(tmp_path, clock, disk, every=2)
    workers = members(h1)
    disk.arm(fail)
    for r in range(3):
        round_(h1, workers, r)
    h1.core.snapshots.wait()
    assert disk.failed >= 1 and h1.core.snapshots.failures >= 1
    assert h1.store.latest_snapshot() == (0, None) and not list(h1.store.dir.glob("*.tmp"))
    fp = h1.core.reference.fingerprint()
    crash(h1)
    h2 = restart(tmp_path, clock, h1)
    try:
        assert h2.core.reference.committed_rounds == 3 and h2.core.reference.fingerprint() == fp
    finally:
        h2.close()


def test_a_crash_after_the_snapshot_rename_restarts_from_it(tmp_path: Path, clock: Clock) -> None:
    """The snapshot was renamed (complete) but the records before it not pruned yet: the restart starts from it and
    replays only the rounds after it; a snapshot renamed for more rounds than SQLite committed is cut."""
    h1 = start(tmp_path, clock, every=2)
    workers = members(h1)
    for r in range(3):
        round_(h1, workers, r)
    h1.core.snapshots.wait()
    assert h1.store.latest_snapshot()[0] == 2
    fp = h1.core.reference.fingerprint()
    crash(h1)
    stray = h1.store.snapshot_path(7)
    stray.write_bytes(b"renamed, never committed")
    h2 = restart(tmp_path, clock, h1)
    try:
        assert h2.core.reference.committed_rounds == 3 and h2.core.reference.fingerprint() == fp
        assert not stray.exists()
    finally:
        h2.close()


def test_restart_after_n_rounds_replays_to_the_fingerprint_of_every_row(tmp_path: Path, clock: Clock) -> None:
    """7 rounds with snapshot_every = 3: snapshots after 3 and 6 rounds, the older pruned with the records before
    it (keep_results = 1); the restart loads the newest and replays round 6; the run goes on bit-identically to a
    reference that applied every round and never snapshotted."""
    h1 = start(tmp_path, clock, every=3, extra={"keep_results": 1})
    workers = members(h1)
    oracle = oracle_of(h1)
    for r in range(7):
        frames = round_(h1, workers, r)
        oracle.apply(oracle.unpack(frames, r)[0], r)
        h1.core.snapshots.wait()
    assert [n for n, _ in h1.store.snapshots()] == [6]
    assert sorted(p.name for p in h1.store.dir.glob("result-*")) == ["result-00000006.msgpack"]
    assert h1.core.reference.fingerprint() == oracle.fingerprint()
    crash(h1)
    h2 = restart(tmp_path, clock, h1)
    try:
        assert h2.core.reference.committed_rounds == 7 and h2.core.reference.fingerprint() == oracle.fingerprint()
        h2.core.tick()
        frames = round_(h2, workers, 7)
        oracle.apply(oracle.unpack(frames, 7)[0], 7)
        assert h2.core.reference.to_bytes() == oracle.to_bytes()  # θ_ref, buffers and the outer momentum
    finally:
        h2.close()


def test_a_replay_that_does_not_reach_the_rows_fingerprint_refuses_to_serve(tmp_path: Path, clock: Clock) -> None:
    h1 = start(tmp_path, clock, every=100)
    workers = members(h1)
    for r in range(2):
        round_(h1, workers, r)
    crash(h1)
    record = h1.store.dir / "result-00000001.msgpack"
    rec = msgpack.unpackb(record.read_bytes(), raw=False)
    record.write_bytes(record.read_bytes()[:-7])  # a torn record of a committed round
    with pytest.raises(ReplayError, match="cannot replay round 1: result-00000001.msgpack is damaged"):
        restart(tmp_path, clock, h1)
    # a record that checks out but does not lead to the state the row recorded
    record.write_bytes(msgpack.packb(rec, use_bin_type=True))
    store = Store(h1.store.dir)
    store.db.execute("UPDATE rounds SET fingerprint = '0123456789abcdef' WHERE round = 1")
    store.close()
    with pytest.raises(ReplayError, match="replaying round 1 gave fingerprint .* but its row recorded "
                                          "0123456789abcdef"):
        restart(tmp_path, clock, h1)


@pytest.mark.parametrize("budget", [None, 0])
def test_a_snapshot_taken_while_a_round_commits_holds_exactly_its_round(tmp_path: Path, clock: Clock,
                                                                        budget: int | None) -> None:
    """The snapshot of round 1's state stalls in its first tensors while round 2 commits: the commit freezes it
    (clones within the largest tensor's size — or, with no budget, writes the rest itself) before stepping in place.
    The file equals, tensor for tensor, the state after round 1 computed by a reference that never snapshots."""
    disk = CrashDisk()
    disk.stall = 2
    h = start(tmp_path, clock, disk, every=2)
    h.core.snapshots.clone_budget = budget
    try:
        workers = members(h)
        oracle = oracle_of(h)
        for r in range(2):
            frames = round_(h, workers, r)
            oracle.apply(oracle.unpack(frames, r)[0], r)
        want_header, want = oracle.state()
        snapshot = h.core.snapshots.current
        assert snapshot is not None and snapshot.committed == 2
        frames = {}
        for name, w in workers.items():  # round 2 closes on another thread: it blocks in freeze until the
            w.train()                    # stalled writer lets go of the tensor it writes
            frames[name] = w.prepare(2)
        h.submit("a", 2, frames["a"])
        closer = threading.Thread(target=h.submit, args=("b", 2, frames["b"]))
        closer.start()
        closer.join(120)
        assert not closer.is_alive() and h.core.reference.committed_rounds == 3
        h.core.snapshots.wait()
        cloned, written = snapshot.frozen
        assert cloned + written > 0, "the commit did not freeze the snapshot"
        if budget == 0:
            assert cloned == 0 and any(t != "lowband-snapshot" for t, _ in disk.writes)
        assert snapshot.error is None and snapshot.path.exists()
        with safe_open(str(snapshot.path), "pt") as f:
            assert sorted(f.keys()) == sorted(want)
            assert all(torch.equal(f.get_tensor(k), v) for k, v in want.items())
            meta = f.metadata()
        sf = state_file.parse(snapshot.path.read_bytes())  # the digest checks out
        assert sf.header["committed_rounds"] == 2 and sf.header["fingerprint"] == want_header["fingerprint"]
        assert state_file.META_KEY in meta
        fresh = oracle_of(h)
        fresh.load_bytes(snapshot.path.read_bytes())
        got = fresh.state()[1]
        assert fresh.fingerprint() == oracle.fingerprint() and all(torch.equal(got[k], v) for k, v in want.items())
    finally:
        h.close()


def test_a_state_dir_of_the_format_before_the_log_loads(tmp_path: Path, clock: Clock) -> None:
    """state-NNNNNNNN.pt after every round and result files without a checksum (what the coordinator wrote before
    the write-ahead log): the newest state file is the snapshot of the last round, its result is still served."""
    h1 = start(tmp_path, clock, every=100)
    workers = members(h1)
    for r in range(2):
        round_(h1, workers, r)
    fp, blob = h1.core.reference.fingerprint(), h1.core.reference.to_bytes()
    crash(h1)
    d = h1.store.dir
    for r in range(2):
        rec = msgpack.unpackb((d / f"result-{r:08d}.msgpack").read_bytes(), raw=False)
        (d / f"result-{r:08d}.msgpack").write_bytes(msgpack.packb(
            {k: rec[k] for k in ("round", "frames", "aggregate", "keys")}, use_bin_type=True))
    (d / "state-00000002.pt").write_bytes(blob)
    (d / "state-00000001.pt").write_bytes(b"an older state of the old format")
    h2 = restart(tmp_path, clock, h1)
    try:
        assert h2.core.reference.committed_rounds == 2 and h2.core.reference.fingerprint() == fp
        result, _ = h2.core.collect(h2.ids["a"], 1, 0.0, True)
        assert result.reason == "restored" and result.fingerprint == fp
        round_(h2, workers, 2)
        assert h2.core.reference.committed_rounds == 3
    finally:
        h2.close()
    assert not (d / "state-00000001.pt").exists()  # pruned once a newer snapshot was written (at close)


def test_a_joiner_downloads_a_snapshot_and_catches_up_on_the_rounds_after_it(tmp_path: Path, clock: Clock) -> None:
    """FetchState streams the newest snapshot file while it is at most keep_results rounds behind; the rounds after it
    come from their write-ahead records, and the joiner ends on the coordinator's fingerprint."""
    h = start(tmp_path, clock, every=2)
    try:
        workers = members(h)
        for r in range(3):
            round_(h, workers, r)
        h.core.snapshots.wait()
        h.core.results.clear()  # as after a restart: the records on disk serve the rounds after the snapshot
        parts = list(h.core.fetch_state(h.ids["a"], 0))
        assert {p["committed_rounds"] for p in parts} == {2}
        joiner = h.worker("c", {"shard": 0, "num_shards": 1})
        joiner.adopt_global_state(b"".join(p["data"] for p in parts))
        assert joiner.fingerprint() == parts[0]["reference_fingerprint"]
        result, _ = h.core.collect(h.ids["a"], 2, 0.0, False)
        observed = RoundResult(2, RoundStatus.COMMITTED, dict(result.frames), member_keys=result.keys)
        assert joiner.apply_observed(observed)
        assert joiner.fingerprint() == h.core.reference.fingerprint() == result.fingerprint
    finally:
        h.close()


def test_a_member_asking_for_its_own_round_never_gets_an_older_snapshot(tmp_path: Path, clock: Clock) -> None:
    """A member that holds c committed rounds (it fell behind or its fingerprint differs) asks FetchState for at least
    c: the coordinator snapshots the current state for it instead of sending the older snapshot a joiner would catch
    up from — a node going back and applying rounds again is what the soak's invariants forbid. One snapshot serves
    every such caller; a value above the committed rounds counts as those."""
    h = start(tmp_path, clock, every=2)
    try:
        workers = members(h)
        for r in range(3):
            round_(h, workers, r)
        h.core.snapshots.wait()
        assert h.store.latest_snapshot()[0] == 2
        assert {p["committed_rounds"] for p in h.core.fetch_state(h.ids["a"], 0)} == {2}  # a joiner catches up
        parts = list(h.core.fetch_state(h.ids["a"], 0, min_committed=3))
        assert {p["committed_rounds"] for p in parts} == {3}
        assert parts[0]["reference_fingerprint"] == h.core.reference.fingerprint()
        fresh = oracle_of(h)
        fresh.load_bytes(b"".join(p["data"] for p in parts))
        assert fresh.fingerprint() == h.core.reference.fingerprint()
        snapshot = h.store.latest_snapshot()
        assert snapshot[0] == 3
        assert {p["committed_rounds"] for p in h.core.fetch_state(h.ids["b"], 0, min_committed=10**6)} == {3}
        assert h.store.latest_snapshot() == snapshot  # the same file: no second snapshot for the same round
    finally:
        h.close()


def test_a_collector_that_did_not_submit_gets_its_own_frame_too(tmp_path: Path, clock: Clock) -> None:
    """The frame committed under a member's name is sent back to it when it collects without having submitted (it
    may have gone back to an older state, or restarted, and trained that round again: its frame now is another); a
    member that submitted gets every frame but its own."""
    h = start(tmp_path, clock, every=100)
    try:
        workers = members(h)
        frames = round_(h, workers, 0)
        _, to_send = h.core.collect(h.ids["a"], 0, 0.0, True)
        assert to_send == ["b"]
        result, to_send = h.core.collect(h.ids["a"], 0, 0.0, False)
        assert to_send == ["a", "b"] and result.frames["a"] == frames["a"]
    finally:
        h.close()


def test_a_state_too_far_behind_for_joiners_is_snapshotted_on_demand(tmp_path: Path, clock: Clock) -> None:
    h = start(tmp_path, clock, every=100, extra={"keep_results": 1})
    try:
        workers = members(h)
        for r in range(3):
            round_(h, workers, r)
        assert h.store.latest_snapshot() == (0, None)
        committed, blob, fp = h.core.state_blob()
        assert committed == 3 and fp == h.core.reference.fingerprint()
        fresh = oracle_of(h)
        fresh.load_bytes(blob)
        assert fresh.fingerprint() == fp
    finally:
        h.close()


def test_the_streamed_layout_is_a_safetensors_file_for_every_dtype(tmp_path: Path) -> None:
    """coordinator/snapshot.py writes the format itself: every dtype of the state format, empty and scalar
    tensors, read back by safetensors and by lowband's own parser."""
    from coordinator.snapshot import Snapshot

    tensors = {f"t/{code}": (torch.arange(6).reshape(2, 3) % 2).to(dtype) for code, dtype in wire.DTYPE_CODES.items()}
    tensors |= {"t/empty": torch.empty(0, 4), "t/scalar": torch.tensor(3.5)}
    path = tmp_path / "snap.safetensors"
    snap = Snapshot(Disk(), path, 0, tensors, {"kind": "test"})
    snap.write()
    with safe_open(str(path), "pt") as f:
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    sf = state_file.parse(path.read_bytes())
    assert sf.header["kind"] == "test" and all(torch.equal(sf.tensor(k), v) for k, v in tensors.items())


def test_export_replays_the_rounds_after_the_newest_snapshot(tmp_path: Path, clock: Clock) -> None:
    from coordinator.replay import state_bytes

    h1 = start(tmp_path, clock, every=2)
    workers = members(h1)
    for r in range(3):
        round_(h1, workers, r)
    h1.core.snapshots.wait()
    fp = h1.core.reference.fingerprint()
    crash(h1)
    store = Store(h1.store.dir)
    try:
        assert store.latest_snapshot()[0] == 2
        committed, blob = state_bytes(store)
    finally:
        store.close()
    fresh = oracle_of(h1)
    fresh.load_bytes(blob)
    assert committed == 3 and fresh.fingerprint() == fp


def test_a_snapshot_the_commit_cannot_finish_is_abandoned_and_the_round_still_commits(tmp_path: Path,
                                                                                     clock: Clock) -> None:
    """The disk fails while the committing thread writes a running snapshot's tensors (freeze): that snapshot is
    abandoned (no file), the round is committed and stepped exactly once, and the next snapshot is complete."""
    disk = CrashDisk()
    disk.stall = 2
    h = start(tmp_path, clock, disk, every=2)
    h.core.snapshots.clone_budget = 0  # every tensor not written yet is written by the commit
    try:
        workers = members(h)
        oracle = oracle_of(h)
        for r in range(2):
            frames = round_(h, workers, r)
            oracle.apply(oracle.unpack(frames, r)[0], r)
        snapshot = h.core.snapshots.current
        disk.arm("freeze-write")
        frames = {}
        for name, w in workers.items():
            w.train()
            frames[name] = w.prepare(2)
        h.submit("a", 2, frames["a"])
        closer = threading.Thread(target=h.submit, args=("b", 2, frames["b"]))
        closer.start()
        closer.join(120)
        oracle.apply(oracle.unpack(frames, 2)[0], 2)
        h.core.snapshots.wait()
        assert disk.failed == 1 and snapshot.error is not None and not snapshot.path.exists()
        assert h.core.persistence.ok and h.core.reference.committed_rounds == 3
        assert h.core.reference.fingerprint() == oracle.fingerprint() == h.store.fingerprints(2)[2]
        assert not list(h.store.dir.glob("*.tmp"))
        disk.arm("")
        round_(h, workers, 3)  # a snapshot is due again (after round 2 or 3, as the abandoned one ended)
        h.core.snapshots.wait()
        held, path = h.store.latest_snapshot()
        assert held in (3, 4) and path is not None
        fresh = oracle_of(h)
        fresh.load_bytes(path.read_bytes())
        assert fresh.committed_rounds == held and fresh.fingerprint() == h.store.fingerprints(held - 1)[held - 1]
    finally:
        h.close()


def test_a_result_read_back_from_its_record_is_read_once(tmp_path: Path, clock: Clock) -> None:
    """After a restart every member collects the last round from its record: it is read (and hashed) once and then
    served from memory — here its file is gone after the first read, and the next collects still get it."""
    h = start(tmp_path, clock, every=100)
    workers = members(h)
    frames = round_(h, workers, 0)
    crash(h)
    h2 = restart(tmp_path, clock, h, every=100)
    try:
        first, _ = h2.core.collect(h2.ids["a"], 0, 0.0, False)
        assert first.frames == frames
        (tmp_path / "state" / "result-00000000.msgpack").unlink()
        for name in ("a", "b"):
            again, to_send = h2.core.collect(h2.ids[name], 0, 0.0, True)
            assert again is first and to_send == [n for n in sorted(frames) if n != name]
    finally:
        h2.close()
