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
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack
import pytest

from core_harness import Clock, Harness
from coordinator.core import Chunk
from coordinator.errors import CoordinatorError, NotSubmitted, Unavailable
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
        if fail == "fsync" and h.core.open_round == 1 and h.core.persistence.ok and not h.core.submitted:
            # the record failed its fsync: its frames were dropped, and a member's Collect says so; all resend
            with pytest.raises(NotSubmitted):
                h.core.collect(h.ids["a"], 1, 0.0, True)
            assert not _submit(h, frames, 1)
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


def test_a_retry_after_the_folders_fsync_failed_syncs_the_folder_again_before_the_commit_point(
        tmp_path: Path, clock: Clock) -> None:
    """The rename of the record happened but the folder's fsync failed: the rename is not durable yet. The row (the
    commit point) must not be written before the folder is synced again — else a power cut after the row loses the
    record of a committed round, and the restart cannot replay it. (A version-1 record's retry rewrites it whole.)"""
    disk = StreamDisk()
    h = Harness(tmp_path / "state", clock, COMPRESSED, disk=disk)
    try:
        workers = _members(h)
        disk.arm("dir-fsync")
        assert not _submit(h, _frames(workers, 0, ("c", "a", "b")), 0)
        assert disk.failed == 1 and h.core.open_round == 0
        clock.advance(1.0)
        h.core.tick()
        assert h.core.open_round == 1
        after = disk.events[disk.events.index("failed dir-fsync") + 1:]
        assert "sync_dir" in after[:after.index("transaction")], disk.events
    finally:
        h.close()


def test_an_upload_in_flight_when_a_streamed_commit_failed_after_its_publication_is_refused_cleanly(
        tmp_path: Path, clock: Clock) -> None:
    """c's upload starts while the round is open; the round closes at its deadline with a and b, its record is
    published but the row fails. c's last chunk then arrives: the answer is a coordinator error (the client backs
    off), not a ValueError from writing into the published file; the retry commits a and b only."""
    disk = StreamDisk()
    h = Harness(tmp_path / "state", clock, COMPRESSED, disk=disk)
    try:
        workers = _members(h)
        frames = _frames(workers, 0, ("a", "b", "c"))
        assert not _submit(h, {n: frames[n] for n in ("a", "b")}, 0)
        data = frames["c"]
        half = len(data) // 2
        pieces = h.chunks("c", 0, data, piece=half + 1)
        assert len(pieces) == 2

        def upload() -> Iterator[Chunk]:
            yield pieces[0]
            disk.arm("row")
            clock.advance(float(h.core.deadline - clock.t) + 0.1)  # the round's deadline: it closes with a and b
            for n in ("a", "b", "c"):
                h.core.heartbeat(h.ids[n])
            h.core.tick()
            assert disk.failed == 1 and h.core.open_round == 0 and "published" in disk.events
            yield pieces[1]

        with pytest.raises(CoordinatorError):
            h.core.submit(upload())
        clock.advance(1.0)
        h.core.tick()
        assert h.core.open_round == 1 and h.core.persistence.ok
        rec = h.store.record(0)
        assert list(rec["frames"]) == ["a", "b"] and rec["applied"]["order"] == ["a", "b"]
    finally:
        h.close()


def _forge(d: Path, round_: int, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite ``d``'s version-2 record of ``round_`` with its trailer changed by ``edit`` and a checksum that
    matches (sha256 is no secret: anyone who can write the state dir can compute it)."""
    path = d / f"result-{round_:08d}.msgpack"
    blob = path.read_bytes()
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(blob))
    unpacker.feed(blob)
    start = 0
    for obj in unpacker:
        if isinstance(obj, dict) and "sha256" in obj:
            break
        start = unpacker.tell()
    edit(obj)
    prefix = hashlib.sha256(blob[:start]).digest()
    obj["sha256"] = hashlib.sha256(prefix + msgpack.packb([obj["members"], obj.get("aggregate"), obj.get("keys"),
                                                           obj.get("applied")], use_bin_type=True)).hexdigest()
    path.write_bytes(blob[:start] + msgpack.packb(obj, use_bin_type=True))


def _one_round(tmp_path: Path, clock: Clock) -> Path:
    h = Harness(tmp_path / "state", clock, COMPRESSED)
    workers = _members(h)
    assert not _submit(h, _frames(workers, 0, ("c", "a", "b")), 0)
    _crash(h)
    return tmp_path / "state"


HOSTILE: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("key-is-a-huge-int", lambda t: t.update(keys={"a": 2 ** 63})),
    ("key-is-a-large-int", lambda t: t.update(keys={"a": 2 ** 62})),
    ("keys-is-a-list", lambda t: t.update(keys=[1, 2])),
    ("aggregate-is-a-huge-int", lambda t: t.update(aggregate=2 ** 63)),
    ("aggregate-is-a-large-int", lambda t: t.update(aggregate=2 ** 62)),
    ("applied-is-a-list", lambda t: t.update(applied=["compressed"])),
    ("order-of-mixed-types", lambda t: t["applied"].update(order=[1, "a", "b"])),
    ("order-of-lists", lambda t: t["applied"].update(order=[["a"], ["b"], ["c"]])),
]


@pytest.mark.parametrize("edit", [e for _, e in HOSTILE], ids=[n for n, _ in HOSTILE])
def test_a_hostile_streamed_record_is_refused_at_restart_not_a_crash(tmp_path: Path, clock: Clock,
                                                                     edit: Callable[[dict[str, Any]], None]) -> None:
    """A committed round's record whose trailer was rewritten (with a checksum that matches) holds fields of the
    wrong type or an integer where bytes belong: reading it raises WalError (never bytes(2**62): a 4 EiB
    allocation), and the restart refuses to serve with ReplayError rather than crash with TypeError."""
    d = _one_round(tmp_path, clock)
    _forge(d, 0, edit)
    store = Store(d)
    try:
        try:
            store.record(0)
        except WalError:
            pass
    finally:
        store.close()
    with pytest.raises(ReplayError):
        Harness(d, clock, COMPRESSED)


@pytest.mark.parametrize("field", ["frames", "keys", "aggregate"])
def test_a_version_1_record_with_an_integer_where_bytes_belong_is_refused_without_allocating_it(
        tmp_path: Path, field: str) -> None:
    """The record format before the streamed one (a single map, coordinator/store.py): the same integer-for-bytes
    damage, checked before the checksum is, raises WalError rather than allocate 2**62 bytes."""
    store = Store(tmp_path / "state")
    try:
        rec = {"round": 0, "frames": {"a": b"x"}, "aggregate": b"y", "keys": {"a": b"k"}, "applied": {}, "sha256": ""}
        rec[field] = 2 ** 62 if field == "aggregate" else {"a": 2 ** 62}
        (tmp_path / "state" / "result-00000000.msgpack").write_bytes(msgpack.packb(rec, use_bin_type=True))
        with pytest.raises(WalError):
            store.record(0)
    finally:
        store.close()


class LostWritebackDisk(Disk):
    """The first publication of a round's record fails its fsync with EIO, and — as Linux does after a writeback
    error — the pages that were not written are lost to the file while a later fsync of it succeeds: here the
    record's first frame comes back as zeros."""

    def __init__(self) -> None:
        self.armed = False

    def publish(self, f: Any, path: Path) -> None:
        if self.armed and path.name.startswith("result-"):
            self.armed = False
            head = len(msgpack.packb({"lowband-wal": 2, "round": 0}, use_bin_type=True))
            os.pwrite(f.fileno(), bytes(64), head + 64)  # inside the first frame: the page writeback lost
            raise OSError(errno.EIO, "Input/output error (fsync of the write-ahead record)")
        super().publish(f, path)


def test_a_record_whose_fsync_failed_is_not_published_by_a_retry_that_fsyncs_it_again(
        tmp_path: Path, clock: Clock) -> None:
    """After an fsync error the file's contents on disk are unknown (fsync reports the error once; the retry's
    fsync succeeds over pages that were never written). A version-1 record's retry rewrites it whole from memory;
    a streamed one holds its frames only in that file, so a retry that fsyncs it again publishes a record that
    does not hold what was applied — the round is committed and applied, and a restart cannot replay it. The
    round must not commit from that file (its frames are submitted again, or the file is rewritten)."""
    disk = LostWritebackDisk()
    h = Harness(tmp_path / "state", clock, COMPRESSED, disk=disk)
    workers = _members(h)
    disk.armed = True
    frames = _frames(workers, 0, ("c", "a", "b"))
    errors = _submit(h, frames, 0)
    assert not errors and h.core.open_round == 0 and not h.core.persistence.ok
    for _ in range(6):  # the coordinator retries; members resend what it asks for
        clock.advance(2.0)
        for n in ("a", "b", "c"):
            h.core.heartbeat(h.ids[n])
        h.core.tick()
        for n in ("a", "b", "c"):
            if h.core.open_round == 0 and h.ids[n] not in h.core.submitted:
                _submit(h, {n: frames[n]}, 0)
    assert h.core.open_round == 1
    fingerprint = h.core.reference.fingerprint()
    _crash(h)
    h2 = Harness(tmp_path / "state", clock, COMPRESSED)  # raises ReplayError when the record is not what was applied
    try:
        assert h2.core.open_round == 1 and h2.core.reference.fingerprint() == fingerprint
    finally:
        h2.close()


def test_a_clean_stop_with_an_open_streamed_round_leaves_nothing_that_breaks_the_next_start(
        tmp_path: Path, clock: Clock) -> None:
    """core.close() with frames of the open round in its record: the temporary record is removed, and the next
    start serves the round again; the members' frames, submitted again, commit it."""
    h = Harness(tmp_path / "state", clock, COMPRESSED)
    workers = _members(h)
    assert not _submit(h, _frames(workers, 0, ("c", "a", "b")), 0)
    frames = _frames(workers, 1, ("a", "b"))
    assert not _submit(h, frames, 1)
    ids, keys = dict(h.ids), h.keys
    h.close()
    assert not list((tmp_path / "state").glob("*.tmp"))
    h2 = Harness(tmp_path / "state", clock, COMPRESSED)
    try:
        h2.ids, h2.keys = ids, keys
        assert h2.core.open_round == 1 and not h2.core.submitted
        frames.update(_frames(workers, 1, ("c",)))
        assert not _submit(h2, frames, 1)
        assert h2.core.open_round == 2 and list(h2.store.record(1)["frames"]) == ["a", "b", "c"]
    finally:
        h2.close()


def test_two_uploads_of_one_member_at_once_count_one_frame(tmp_path: Path, clock: Clock) -> None:
    """A member's upload is overtaken by a second one (a retry that did not wait, or a hostile member sending two
    different frames): whichever finishes first is the frame; the other is refused, and the record, the running
    reduce and the round hold one frame of it."""
    h = Harness(tmp_path / "state", clock, COMPRESSED)
    try:
        workers = _members(h)
        frames = _frames(workers, 0, ("a", "b", "c"))
        other = h.frame("a", 0)
        first = h.chunks("a", 0, frames["a"], piece=len(frames["a"]) // 2 + 1)

        def slow() -> Iterator[Chunk]:
            yield first[0]
            assert h.core.submit(iter(h.chunks("a", 0, other)))["accepted"]  # overtakes it, whole
            yield first[1]

        with pytest.raises(CoordinatorError):
            h.core.submit(slow())
        assert not _submit(h, {n: frames[n] for n in ("b", "c")}, 0)
        rec = h.store.record(0)
        assert list(rec["frames"]) == ["a", "b", "c"] and rec["frames"]["a"] == other
    finally:
        h.close()


def test_after_a_restart_a_streamed_rounds_result_is_served_from_its_record(tmp_path: Path, clock: Clock) -> None:
    """The aggregate a member collects after a restart (read back from the version-2 record) is the one the live
    coordinator handed out, and the frames are not sent (members get the aggregate only)."""
    h = Harness(tmp_path / "state", clock, COMPRESSED)
    workers = _members(h)
    assert not _submit(h, _frames(workers, 0, ("c", "a", "b")), 0)
    live, to_send = h.core.collect(h.ids["a"], 0, 0.0, True)
    assert live.aggregate is not None and to_send == []
    ids, keys = dict(h.ids), h.keys
    _crash(h)
    h2 = Harness(tmp_path / "state", clock, COMPRESSED)
    try:
        h2.ids, h2.keys = ids, keys
        h2.join("a")  # the member joins again after the restart
        got, to_send = h2.core.collect(h2.ids["a"], 0, 0.0, True)
        assert got.aggregate == live.aggregate and got.fingerprint == live.fingerprint and to_send == []
        assert set(got.frames) == {"a", "b", "c"} and not any(got.frames.values())
    finally:
        h2.close()
