"""Adversarial checks of the frame-by-frame reduce and its streamed write-ahead record (coordinator/accumulate.py,
coordinator/wal_stream.py): a crash or a disk error at each write of a streamed round — a frame's pwrite, the
trailer's, the fsync and the rename of its publication, the folder's fsync, the row, the fingerprint — restarts at
the right round with the right fingerprint (or, retried in place, commits the round once); an upload that was in
flight when a commit failed gets a clean refusal; a record on disk whose bytes are hostile (a forged checksum is
only sha256) is refused with WalError / ReplayError, never crashes the coordinator or makes it allocate what the
record claims. Faults through the store's ``Disk`` seam; harness: core_harness.py, fixtures: conftest.py."""
from __future__ import annotations

import errno
import hashlib
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack
import pytest

from core_harness import Clock, Harness
from coordinator.core import Chunk
from coordinator.errors import CoordinatorError, Unavailable
from coordinator.replay import ReplayError
from coordinator.store import Disk, Store, WalError

COMPRESSED = {"run": {"recipe": "sign-nesterov"}, "rounds": {"result": "compressed", "snapshot_every": 100},
              "membership": {"min_nodes": 2, "max_nodes": 3}}


def _is_trailer(data: bytes | memoryview) -> bool:
    try:
        obj = msgpack.unpackb(bytes(data), raw=False)
    except Exception:  # a frame piece or the header: not the trailer
        return False
    return isinstance(obj, dict) and "sha256" in obj


class StreamDisk(Disk):
    """Raises EIO once at the write named by ``fail``: "frame" (a frame's pwrite into a round's record), "trailer"
    (the trailer's pwrite), "fsync" (the publication, before the rename), "dir-fsync" (the publication after the
    rename: the folder's fsync failed), "row" (the round's row), "fingerprint" (the fingerprint's transaction).
    ``events``: what happened, in order, for the checks that need the order."""

    def __init__(self) -> None:
        self.fail = ""
        self.failed = 0
        self.transactions = 0
        self.events: list[str] = []

    def arm(self, what: str) -> None:
        self.fail, self.failed, self.transactions = what, 0, 0

    def _boom(self, what: str) -> None:
        if self.fail == what and not self.failed:
            self.failed += 1
            self.events.append(f"failed {what}")
            raise OSError(errno.EIO, f"Input/output error ({what})")

    def pwrite(self, f: Any, data: bytes | memoryview, offset: int) -> None:
        if Path(f.name).name.startswith("result-") and offset > 0:
            self._boom("trailer" if _is_trailer(data) else "frame")
        super().pwrite(f, data, offset)

    def publish(self, f: Any, path: Path) -> None:
        if path.name.startswith("result-"):
            self._boom("fsync")
            super().publish(f, path)
            self.events.append("published")
            self._boom("dir-fsync")  # renamed (and the folder synced once here): what a failed folder fsync leaves
            return
        super().publish(f, path)

    def sync_dir(self, path: Path) -> None:  # the folder's fsync on its own, where the Disk has one
        self.events.append("sync_dir")
        super().sync_dir(path)  # type: ignore[misc]

    def transaction(self, db: Any, statements: Callable[[], None]) -> None:
        self.transactions += 1
        if self.fail in ("row", "fingerprint"):
            if self.transactions == (1 if self.fail == "row" else 2):
                self._boom(self.fail)
        super().transaction(db, statements)
        self.events.append("transaction")


def _crash(h: Harness) -> None:
    """The process dies: the snapshot thread finishes, the store closes, ``core.close()`` never runs."""
    h.core.snapshots.wait()
    h.store.close()


def _members(h: Harness) -> dict[str, Any]:
    return {n: h.worker(n, h.join(n)) for n in ("a", "b", "c")}


def _frames(workers: dict[str, Any], r: int, order: tuple[str, ...]) -> dict[str, bytes]:
    out = {}
    for n in order:
        workers[n].train()
        out[n] = workers[n].prepare(r)
    return out


def _submit(h: Harness, frames: dict[str, bytes], r: int) -> dict[str, Exception]:
    """Submit each frame in turn; the refusals, by sender."""
    errors = {}
    for n, f in frames.items():
        try:
            h.submit(n, r, f)
        except CoordinatorError as exc:
            errors[n] = exc
    return errors


FAULTS = [("frame", 1), ("trailer", 1), ("fsync", 1), ("dir-fsync", 1), ("row", 1), ("fingerprint", 2)]


@pytest.mark.parametrize("fail, committed", FAULTS, ids=[f for f, _ in FAULTS])
def test_a_crash_at_each_write_of_a_streamed_round_restarts_at_the_right_round(tmp_path: Path, clock: Clock,
                                                                                fail: str, committed: int) -> None:
    disk = StreamDisk()
    h = Harness(tmp_path / "state", clock, COMPRESSED, disk=disk)
    workers = _members(h)
    assert not _submit(h, _frames(workers, 0, ("c", "a", "b")), 0)
    fps = [h.core.reference.fingerprint()]
    disk.arm(fail)
    errors = _submit(h, _frames(workers, 1, ("b", "c", "a")), 1)
    assert disk.failed == 1
    if fail == "frame":
        assert [type(e) for e in errors.values()] == [Unavailable]
    fps.append(h.core.reference.fingerprint())
    _crash(h)
    h2 = Harness(tmp_path / "state", clock, COMPRESSED)
    try:
        assert h2.core.reference.committed_rounds == committed and h2.core.open_round == committed
        assert h2.core.reference.fingerprint() == fps[committed - 1]
        assert h2.store.fingerprints(0) == {r: fps[r] for r in range(committed)}
        assert sorted(p.name for p in h2.store.dir.glob("result-*")) == [f"result-{r:08d}.msgpack"
                                                                         for r in range(committed)]
    finally:
        h2.close()


@pytest.mark.parametrize("fail", [f for f, _ in FAULTS])
def test_a_disk_error_at_each_write_of_a_streamed_round_is_retried_and_commits_it_once(tmp_path: Path, clock: Clock,
                                                                                        fail: str) -> None:
    """Retried in place (the coordinator's tick), the round commits once, with every frame accepted: its record
    lists them in the order they came, and a restart from the seed replays to the live fingerprint."""
    disk = StreamDisk()
    h = Harness(tmp_path / "state", clock, COMPRESSED, disk=disk)
    workers = _members(h)
    assert not _submit(h, _frames(workers, 0, ("c", "a", "b")), 0)
    disk.arm(fail)
    frames = _frames(workers, 1, ("b", "c", "a"))
    errors = _submit(h, frames, 1)
    if fail == "frame":  # the first frame ("b") was refused: sent again, it is taken
        assert [(n, type(e)) for n, e in errors.items()] == [("b", Unavailable)]
        assert h.core.open_round == 1
        assert h.submit("b", 1, frames["b"])["accepted"]
        order = ["c", "a", "b"]
    else:
        assert not errors
        order = ["b", "c", "a"]
    for _ in range(6):
        clock.advance(2.0)  # past any backoff (members heartbeat): the tick retries the commit
        for n in ("a", "b", "c"):
            h.core.heartbeat(h.ids[n])
        h.core.tick()
    assert h.core.open_round == 2 and h.core.persistence.ok and h.store.last_round() == 1
    rec = h.store.record(1)
    assert list(rec["frames"]) == order and rec["frames"] == frames and rec["applied"]["order"] == order
    fingerprint = h.core.reference.fingerprint()
    assert h.store.fingerprints(1)[1] == fingerprint
    _crash(h)
    h2 = Harness(tmp_path / "state", clock, COMPRESSED)
    try:
        assert h2.core.open_round == 2 and h2.core.reference.fingerprint() == fingerprint
    finally:
        h2.close()
