"""Crash-safe persistence of the coordinator: SQLite for metadata, a write-ahead log of rounds, snapshots.

Order at each commit: the round's write-ahead record — its accepted frames, the keys they were verified with, the
aggregate if any, how it was applied and a checksum (``result-NNNNNNNN.msgpack``) — is written to a temporary name,
fsynced and renamed; then one SQLite transaction records the round — the commit point. Only then does the
coordinator apply the outer step to its live state, and record the state's fingerprint in the round's row (a
second, small transaction; a crash before it leaves the row without one, which the replay fills in). The state
itself is written every ``rounds.snapshot_every`` rounds, off the commit path (coordinator/snapshot.py:
``snapshot-NNNNNNNN.safetensors``, NNNNNNNN its committed rounds). On start the latest round in SQLite decides
what is loaded: the newest complete snapshot, then the logged rounds after it replayed (coordinator/replay.py).
A crash at any point leaves either the old or the new round, never a mix: a record written for a round that has
no row (the crash came before the commit point) is cut on start, never replayed.

State dirs written before the write-ahead log (a ``state-NNNNNNNN.pt`` after every round, same format) still load:
those files count as snapshots.

``commit_round`` raises (OSError, sqlite3.Error) only when the round did not become durable; a failure after the
commit point (the fingerprint, the audit line, removing old files) is logged and retried at the next write.

Every write goes through a ``Disk`` (the seam where tests inject a full or read-only disk, or a crash).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

import msgpack

from node.membership import Member
from node.config import diff_configs
from node.fsutil import write_atomic
from coordinator.wal_stream import StreamedRecord, read_streamed
from node.roundlog import COORDINATOR_LOG, RoundRow

log = logging.getLogger(__name__)
NameRow = tuple[str, bytes, float, float, str]  # a row of the names table (coordinator/names.py)


class Disk:
    """The store's writes. Subclass to inject faults (a test's full or read-only disk raises OSError here)."""

    def write_atomic(self, path: Path, data: bytes | Iterable[bytes]) -> None:
        """``data``: the contents, or pieces written one after another (node/fsutil.py)."""
        write_atomic(path, data)

    def append_line(self, path: Path, line: str) -> None:
        """Append one line durably; a torn last line (a crash or a full disk mid-write) is cut off first, so the
        file stays a sequence of complete lines."""
        with open(path, "ab+") as f:
            end = f.seek(0, os.SEEK_END)
            if end:
                f.seek(max(0, end - 65536))
                tail = f.read()
                if not tail.endswith(b"\n"):
                    cut = tail.rfind(b"\n")
                    f.truncate(end - len(tail) + cut + 1 if cut >= 0 else (0 if end <= 65536 else end))
                    f.seek(0, os.SEEK_END)
            f.write(line.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def unlink(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    # a file written piece by piece at offsets (a snapshot, coordinator/snapshot.py), then published atomically
    def open_tmp(self, path: Path) -> IO[bytes]:
        """``path``.tmp, created empty, for ``pwrite``; ``publish`` renames it to ``path``."""
        return open(path.with_name(path.name + ".tmp"), "wb+")

    def pwrite(self, f: IO[bytes], data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(f.fileno(), view, offset)
            view, offset = view[n:], offset + n

    def pread(self, f: IO[bytes], n: int, offset: int) -> bytes:
        data = os.pread(f.fileno(), n, offset)
        if len(data) != n:
            raise OSError(f"short read of {f.name}: {len(data)} of {n} bytes at {offset}")
        return data

    def publish(self, f: IO[bytes], path: Path) -> None:
        """fsync the temporary file, rename it to ``path``, fsync the folder."""
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(path.with_name(path.name + ".tmp"), path)
        self.sync_dir(path.parent)

    def sync_dir(self, folder: Path) -> None:
        """fsync ``folder``: a rename in it is durable once this returns."""
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def discard(self, f: IO[bytes], path: Path) -> None:
        """Close and remove a temporary file that will not be published (a failed snapshot)."""
        f.close()
        path.with_name(path.name + ".tmp").unlink(missing_ok=True)

    def transaction(self, db: sqlite3.Connection, statements: Callable[[], None]) -> None:
        """Run ``statements`` in one SQLite transaction (all or nothing)."""
        with db:
            db.execute("BEGIN")
            statements()


def _real(value: float | None) -> float:
    """SQLite stores NaN as NULL: read it back as NaN ("not measured"), never as None or 0."""
    return float("nan") if value is None else float(value)


def _held_bytes(value: Any, what: str) -> bytes:
    """``value`` read from a record, which must be bytes: never ``bytes(n)`` of an integer n (n bytes allocated)."""
    if not isinstance(value, bytes):
        raise ValueError(f"{what} is a {type(value).__name__}, not bytes")
    return value


class WalError(ValueError):
    """A write-ahead record of a committed round is missing or damaged: the state cannot be rebuilt from it."""


def record_digest(round_: int, frames: dict[str, bytes], aggregate: bytes | None, keys: dict[str, bytes],
                  applied: dict[str, Any]) -> str:
    """sha256 over everything a write-ahead record holds, in a fixed order (names sorted, lengths framed)."""
    h = hashlib.sha256(f"lowband-wal-1\0{round_}\0".encode())
    for name in sorted(frames):
        h.update(f"frame\0{name}\0{len(frames[name])}\0".encode())
        h.update(frames[name])
    for name in sorted(keys):
        h.update(f"key\0{name}\0{len(keys[name])}\0".encode())
        h.update(keys[name])
    h.update(b"aggregate\0" + (b"-" if aggregate is None else f"{len(aggregate)}\0".encode() + aggregate))
    h.update(json.dumps(applied, sort_keys=True).encode())
    return h.hexdigest()


def record_pieces(record: dict[str, Any]) -> Iterator[bytes]:
    """``msgpack.packb(record, use_bin_type=True)``, byte for byte, as a sequence of pieces: each frame of
    ``record["frames"]`` is packed on its own, so writing a round of N frames never holds a second copy of all of
    them (at 256 members of a 10M-parameter sign model, 311 MB)."""
    packer = msgpack.Packer(use_bin_type=True)
    yield packer.pack_map_header(len(record))
    for key, value in record.items():
        yield packer.pack(key)
        if key != "frames":
            yield packer.pack(value)
            continue
        yield packer.pack_map_header(len(value))
        for name, frame in value.items():
            yield packer.pack(name)
            yield packer.pack(frame)


SNAPSHOT_GLOB, LEGACY_STATE_GLOB, RESULT_GLOB = "snapshot-*.safetensors", "state-*.pt", "result-*.msgpack"


class Store:
    def __init__(self, state_dir: str | Path, keep: int = 3, disk: Disk | None = None) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep  # round records kept at least (late collectors), beyond what a replay needs
        self.disk = disk or Disk()
        self.pending: list[str] = []  # audit lines of durable rounds not yet appended (the disk failed after commit)
        self.pending_fingerprints: dict[int, str] = {}  # round → its fingerprint, not yet in its row (disk failed)
        self.db = sqlite3.connect(self.dir / "coordinator.sqlite", check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript("""
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS rounds (round INTEGER PRIMARY KEY, committed_at REAL, members TEXT,
                reason TEXT, fingerprint TEXT, bytes_in INTEGER, bytes_out INTEGER, duration_s REAL,
                mean_loss REAL, val_loss REAL, close TEXT DEFAULT '');
            CREATE TABLE IF NOT EXISTS members (node_id TEXT PRIMARY KEY, name TEXT, first_round INTEGER,
                shard INTEGER, joined_at REAL, capabilities TEXT, rounds_contributed INTEGER,
                bytes_in INTEGER, bytes_out INTEGER, public_key BLOB DEFAULT NULL);
            CREATE TABLE IF NOT EXISTS names (name TEXT PRIMARY KEY, public_key BLOB NOT NULL, bound_at REAL,
                last_join REAL, evicted TEXT NOT NULL DEFAULT '');
        """)
        if "close" not in {r[1] for r in self.db.execute("PRAGMA table_info(rounds)")}:  # a state dir from before
            self.db.execute("ALTER TABLE rounds ADD COLUMN close TEXT DEFAULT ''")
        if "public_key" not in {r[1] for r in self.db.execute("PRAGMA table_info(members)")}:
            self.db.execute("ALTER TABLE members ADD COLUMN public_key BLOB DEFAULT NULL")

    # -- identity ------------------------------------------------------------------------------------
    def check_identity(self, run_id: str, config_hash: str, legacy_hash: str = "",
                       config: dict[str, Any] | None = None) -> str | None:
        """Record the run on first use; on later starts return a message if the run file changed, naming the settings
        that differ where the state dir recorded them (``config``: the run's config as a dict; dirs written before it
        was recorded get the hashes only). ``legacy_hash``: the same run's hash as protocol 2 computed it; a state dir
        recorded with it is this run, and is re-recorded."""
        rows = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        recorded = [("run_id", run_id), ("config_hash", config_hash)]
        if config is not None:
            recorded.append(("config_json", json.dumps(config, sort_keys=True)))
        if not rows:
            self.disk.transaction(self.db, lambda: self.db.executemany("INSERT INTO meta VALUES (?, ?)", recorded))
            return None
        if legacy_hash and rows.get("run_id") == run_id and rows.get("config_hash") == legacy_hash:
            self.disk.transaction(self.db, lambda: self.db.execute(
                "UPDATE meta SET value = ? WHERE key = 'config_hash'", (config_hash,)))
            return None
        if rows.get("run_id") != run_id or rows.get("config_hash") != config_hash:
            differs = ""
            if config is not None and "config_json" in rows:
                changed = diff_configs(json.loads(rows["config_json"]), config)
                differs = f" Differences (state dir vs run file): {'; '.join(changed)}." if changed else ""
            return (f"state dir {self.dir} holds run {rows.get('run_id')!r} with config hash {rows.get('config_hash')}; "
                    f"this run file is run {run_id!r} with config hash {config_hash}.{differs} Use another "
                    "--state-dir.")
        if config is not None and "config_json" not in rows:  # a dir from before the config was recorded: record it
            self.disk.transaction(self.db, lambda: self.db.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", recorded[-1]))
        return None

    # -- rounds --------------------------------------------------------------------------------------
    def snapshot_path(self, committed: int) -> Path:
        return self.dir / f"snapshot-{committed:08d}.safetensors"

    def _result_path(self, round_: int) -> Path:
        return self.dir / f"result-{round_:08d}.msgpack"

    @staticmethod
    def _number(path: Path) -> int | None:
        digits = path.name.split("-", 1)[1].split(".", 1)[0]
        return int(digits) if digits.isdigit() else None

    def commit_round(self, row: RoundRow, frames: dict[str, bytes], members: dict[str, Member],
                     aggregate: bytes | None = None, keys: dict[str, bytes] | None = None,
                     applied: dict[str, Any] | None = None) -> None:
        """Make a round durable: its write-ahead record, then its row (the commit point). Raises
        OSError/sqlite3.Error when it did not become durable (nothing to undo then). ``keys``: the public keys its
        frames were verified with, by sender (a restored result hands them out; the replay verifies with them).
        ``applied``: how the round was applied (``{"result": "relay"}`` or ``{"result": "aggregate", "codec": ...}``).
        ``row.fingerprint`` may be "" (the state after the round is computed after the commit point):
        ``set_fingerprint`` records it then."""
        keys, applied = keys or {}, applied or {"result": "relay"}
        digest = record_digest(row.round, frames, aggregate, keys, applied)
        self.disk.write_atomic(self._result_path(row.round), record_pieces(
            {"round": row.round, "frames": frames, "aggregate": aggregate, "keys": keys, "applied": applied,
             "sha256": digest}))

        self._insert_row(row, members)  # the commit point

    def _insert_row(self, row: RoundRow, members: dict[str, Member]) -> None:
        def insert() -> None:
            self.db.execute("INSERT OR REPLACE INTO rounds VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                            (row.round, row.committed_at, json.dumps(row.members), row.reason, row.fingerprint,
                             row.bytes_in, row.bytes_out, row.duration_s, row.mean_loss, row.val_loss, row.close))
            self._save_members(members)

        self.disk.transaction(self.db, insert)

    def stream_record(self, round_: int) -> StreamedRecord:
        """A write-ahead record for ``round_`` written as its frames are accepted (coordinator/wal_stream.py); it is
        committed by ``commit_streamed``. Raises OSError."""
        return StreamedRecord(self.disk, self._result_path(round_), round_)

    def commit_streamed(self, row: RoundRow, record: StreamedRecord, members: dict[str, Member],
                        aggregate: bytes | None, keys: dict[str, bytes], applied: dict[str, Any]) -> None:
        """``commit_round`` for a record written frame by frame: its trailer and publication, then the row (the
        commit point). ``row.members``: the record's senders (any order; the record keeps the order they were
        added in). Raises OSError or sqlite3.Error when it did not become durable; a retry goes on from where it
        failed."""
        record.commit(sorted(row.members), aggregate, keys, applied)
        self._insert_row(row, members)  # the commit point

    def set_fingerprint(self, row: RoundRow) -> None:
        """After the commit point: record the state's fingerprint after ``row.round`` and the audit line. Never
        raises for the disk: what could not be written is retried at the next write (``flush``)."""
        self.pending_fingerprints[row.round] = row.fingerprint
        # the audit trail tools read (node/roundlog.py); the round is durable whether or not these succeed now
        self.pending.append(row.to_json())
        self.flush()

    def _write_fingerprints(self) -> None:
        rows = [(fp, r) for r, fp in sorted(self.pending_fingerprints.items())]
        if rows:
            self.disk.transaction(self.db, lambda: self.db.executemany(
                "UPDATE rounds SET fingerprint = ? WHERE round = ?", rows))
            self.pending_fingerprints.clear()

    def flush(self) -> bool:
        """Write the fingerprints and audit lines still pending and remove old files; False (logged) when the disk
        still fails."""
        try:
            self._write_fingerprints()
            while self.pending:
                self.disk.append_line(self.dir / COORDINATOR_LOG, self.pending[0])
                self.pending.pop(0)
            self.prune()
        except (OSError, sqlite3.Error) as exc:
            log.warning("state dir %s: %d fingerprint(s) and %d audit line(s) not written yet (%s); retrying at the "
                        "next write", self.dir, len(self.pending_fingerprints), len(self.pending), exc)
            return False
        return True

    def last_round(self) -> int | None:
        """The last committed round; None for a new run."""
        row = self.db.execute("SELECT MAX(round) FROM rounds").fetchone()
        return None if row[0] is None else int(row[0])

    def fingerprints(self, first: int) -> dict[int, str]:
        """Round → the fingerprint of the state after it ("" where it was not recorded), for rounds ≥ ``first``."""
        out = {int(r): fp or "" for r, fp in self.db.execute(
            "SELECT round, fingerprint FROM rounds WHERE round >= ? ORDER BY round", (first,))}
        out.update({r: fp for r, fp in self.pending_fingerprints.items() if r >= first})
        return out

    def snapshots(self) -> list[tuple[int, Path]]:
        """Complete snapshots (and state files of the format before the write-ahead log) of committed rounds, as
        (committed rounds, path), oldest first; a snapshot of more rounds than SQLite committed (it cannot be
        written before its round commits; a state file renamed just before a crash, in the old format) is left out."""
        last = self.last_round()
        limit = 0 if last is None else last + 1
        found: dict[int, Path] = {}
        for pattern in (LEGACY_STATE_GLOB, SNAPSHOT_GLOB):  # a snapshot wins over a legacy file of the same round
            for path in self.dir.glob(pattern):
                n = self._number(path)
                if n is not None and 0 <= n <= limit:
                    found[n] = path
        return sorted(found.items())

    def latest_snapshot(self) -> tuple[int, Path | None]:
        """(committed rounds, path) of the newest complete snapshot; (0, None) when there is none (the state is then
        the seeded model, and the replay starts at round 0)."""
        snaps = self.snapshots()
        return snaps[-1] if snaps else (0, None)

    def cut_tail(self) -> list[int]:
        """Remove write-ahead records of rounds that never committed (the crash came before their row) and the
        temporary files of interrupted writes; returns the rounds cut. Run once at start, before replaying."""
        last = self.last_round()
        cut = []
        for path in self.dir.glob(RESULT_GLOB):
            n = self._number(path)
            if n is not None and (last is None or n > last):
                self.disk.unlink(path)
                cut.append(n)
        for path in [*self.dir.glob(SNAPSHOT_GLOB), *self.dir.glob(LEGACY_STATE_GLOB)]:
            n = self._number(path)
            if n is not None and n > (0 if last is None else last + 1):  # renamed before a crash, never committed
                self.disk.unlink(path)
        for path in self.dir.glob("*.tmp"):
            self.disk.unlink(path)
        return sorted(cut)

    def prune(self) -> None:
        """Remove snapshots older than the newest complete one, and write-ahead records that neither a replay from it
        nor ``keep`` late collectors need. Raises OSError."""
        committed, newest = self.latest_snapshot()
        last = self.last_round()
        if newest is None or last is None:
            return
        for path in [*self.dir.glob(SNAPSHOT_GLOB), *self.dir.glob(LEGACY_STATE_GLOB)]:
            n = self._number(path)
            if n is not None and n < committed:
                self.disk.unlink(path)
        first_kept = min(committed, last + 1 - self.keep)
        for path in self.dir.glob(RESULT_GLOB):
            n = self._number(path)
            if n is not None and n < first_kept:
                self.disk.unlink(path)

    def record(self, round_: int) -> dict[str, Any] | None:
        """A round's write-ahead record (frames, aggregate, keys, applied), checked against its checksum; None when
        it is not held. Raises WalError for one that is damaged."""
        path = self._result_path(round_)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            streamed = read_streamed(blob, round_)  # version 2: written frame by frame (wal_stream.py)
        except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException) as exc:
            raise WalError(f"{path.name} is damaged: {type(exc).__name__}: {exc}") from None
        if streamed is not None:
            return streamed
        try:
            rec = msgpack.unpackb(blob, raw=False)
            frames = {str(n): _held_bytes(f, "a frame") for n, f in rec["frames"].items()}
            keys = {str(n): _held_bytes(k, "a key") for n, k in (rec.get("keys") or {}).items()}
            aggregate = None if rec.get("aggregate") is None else _held_bytes(rec["aggregate"], "the aggregate")
            applied = rec.get("applied")
            if applied is not None and not isinstance(applied, dict):
                raise ValueError(f"applied is a {type(applied).__name__}, not a map")
        except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException) as exc:
            raise WalError(f"{path.name} is damaged: {type(exc).__name__}: {exc}") from None
        if "sha256" in rec:  # written with the write-ahead log; a result file from before has none
            if rec.get("round") != round_ or rec["sha256"] != record_digest(round_, frames, aggregate, keys, applied):
                raise WalError(f"{path.name} does not match its checksum (damaged on disk)")
        return {"frames": frames, "aggregate": aggregate, "keys": keys if "keys" in rec else None,
                "applied": applied}

    def result(self, round_: int) -> dict[str, bytes] | None:
        rec = self.record(round_)
        return None if rec is None else rec["frames"]

    def aggregate(self, round_: int) -> bytes | None:
        """The aggregate frame of a round committed in aggregate mode (None in relay mode)."""
        rec = self.record(round_)
        return None if rec is None else rec["aggregate"]

    def result_keys(self, round_: int) -> dict[str, bytes] | None:
        """The keys a round's frames were verified with, by sender; None when not held (a result file from before
        they were stored)."""
        rec = self.record(round_)
        return None if rec is None else rec["keys"]

    def set_val_loss(self, round_: int, val_loss: float) -> None:
        self.disk.transaction(self.db, lambda: self.db.execute("UPDATE rounds SET val_loss = ? WHERE round = ?",
                                                               (val_loss, round_)))
        self.pending.append(json.dumps({"round": round_, "val_loss": val_loss}))
        self.flush()

    def recent_rounds(self, limit: int = 20) -> list[RoundRow]:
        rows = self.db.execute("SELECT * FROM rounds ORDER BY round DESC LIMIT ?", (limit,)).fetchall()
        return [RoundRow(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5], r[6], r[7], _real(r[8]), _real(r[9]),
                         r[10] or "") for r in reversed(rows)]

    # -- members -------------------------------------------------------------------------------------
    def _save_members(self, members: dict[str, Member]) -> None:
        self.db.execute("DELETE FROM members")
        self.db.executemany("INSERT INTO members VALUES (?,?,?,?,?,?,?,?,?,?)", [
            (m.node_id, m.name, m.first_round, m.shard, m.joined_at, json.dumps(list(m.capabilities)),
             m.rounds_contributed, m.bytes_in, m.bytes_out, m.public_key) for m in members.values()])

    def save_members(self, members: dict[str, Member], names: Iterable[NameRow] = ()) -> None:
        """Raises OSError/sqlite3.Error when the members could not be written (the caller retries later). ``names``:
        name bindings to write with them (coordinator/names.py), in the same transaction."""
        rows = list(names)

        def write() -> None:
            self._save_members(members)
            self.db.executemany("INSERT OR REPLACE INTO names VALUES (?,?,?,?,?)", rows)

        self.disk.transaction(self.db, write)

    def load_names(self) -> list[NameRow]:
        """Every name bound to a key: (name, key, bound_at, last_join, why its key was evicted or "")."""
        return [(r[0], bytes(r[1]), r[2], r[3], r[4]) for r in self.db.execute("SELECT * FROM names ORDER BY name")]

    def forget_names(self, names: Iterable[str]) -> tuple[list[str], list[str]]:
        """Unbind ``names`` (an operator's decision, before the coordinator starts): (those freed, those kept because
        their key was evicted — the row is what refuses that key). Names not bound are in neither."""
        rows = {n: self.db.execute("SELECT evicted FROM names WHERE name = ?", (n,)).fetchone() for n in names}
        freed = [n for n, r in rows.items() if r is not None and not r[0]]
        self.disk.transaction(self.db, lambda: self.db.executemany("DELETE FROM names WHERE name = ?",
                                                                   [(n,) for n in freed]))
        return freed, [n for n, r in rows.items() if r is not None and r[0]]

    def load_members(self, now: float | None = None) -> dict[str, Member]:
        """Members as of the last save; their leases restart now (a restart must not expel everyone). Members saved
        without a key (a state dir from before protocol 2) are left out: they join again."""
        now = time.monotonic() if now is None else now
        out = {}
        for r in self.db.execute("SELECT * FROM members").fetchall():
            if not r[9]:
                continue
            out[r[0]] = Member(node_id=r[0], name=r[1], first_round=r[2], shard=r[3], joined_at=r[4],
                               last_heartbeat=now, capabilities=tuple(json.loads(r[5])), rounds_contributed=r[6],
                               bytes_in=r[7], bytes_out=r[8], public_key=bytes(r[9]), contributed_at=now)
        return out

    def close(self) -> None:
        self.db.close()

    def info(self) -> dict[str, Any]:
        return dict(self.db.execute("SELECT key, value FROM meta").fetchall())
