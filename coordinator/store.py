"""Crash-safe persistence of the coordinator: SQLite for metadata, write-then-rename files for blobs.

Order at each commit: state blob and round result files are written to temporary names, fsynced and
renamed; then one SQLite transaction records the round — the commit point. On start the latest round in SQLite
decides what is loaded, so a crash at any point leaves either the old or the new round, never a mix.
``commit_round`` raises (OSError, sqlite3.Error) only when the round did not become durable; a failure after the
commit point (the audit line, removing old files) is logged and retried at the next write.

Every write goes through a ``Disk`` (the seam where tests inject a full or read-only disk).
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import msgpack

from node.membership import Member
from node.fsutil import write_atomic
from node.roundlog import COORDINATOR_LOG, RoundRow

log = logging.getLogger(__name__)
NameRow = tuple[str, bytes, float, float, str]  # a row of the names table (coordinator/names.py)


class Disk:
    """The store's writes. Subclass to inject faults (a test's full or read-only disk raises OSError here)."""

    def write_atomic(self, path: Path, data: bytes) -> None:
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

    def transaction(self, db: sqlite3.Connection, statements: Callable[[], None]) -> None:
        """Run ``statements`` in one SQLite transaction (all or nothing)."""
        with db:
            db.execute("BEGIN")
            statements()


def _real(value: float | None) -> float:
    """SQLite stores NaN as NULL: read it back as NaN ("not measured"), never as None or 0."""
    return float("nan") if value is None else float(value)


class Store:
    def __init__(self, state_dir: str | Path, keep: int = 3, disk: Disk | None = None) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.disk = disk or Disk()
        self.pending: list[str] = []  # audit lines of durable rounds not yet appended (the disk failed after commit)
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
    def check_identity(self, run_id: str, config_hash: str, legacy_hash: str = "") -> str | None:
        """Record the run on first use; on later starts return a message if the run file changed. ``legacy_hash``: the
        same run's hash as protocol 2 computed it; a state dir recorded with it is this run, and is re-recorded."""
        rows = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        if not rows:
            self.disk.transaction(self.db, lambda: self.db.executemany(
                "INSERT INTO meta VALUES (?, ?)", [("run_id", run_id), ("config_hash", config_hash)]))
            return None
        if legacy_hash and rows.get("run_id") == run_id and rows.get("config_hash") == legacy_hash:
            self.disk.transaction(self.db, lambda: self.db.execute(
                "UPDATE meta SET value = ? WHERE key = 'config_hash'", (config_hash,)))
            return None
        if rows.get("run_id") != run_id or rows.get("config_hash") != config_hash:
            return (f"state dir {self.dir} holds run {rows.get('run_id')!r} with config hash {rows.get('config_hash')}; "
                    f"this run file is run {run_id!r} with config hash {config_hash}. Use another --state-dir.")
        return None

    # -- rounds --------------------------------------------------------------------------------------
    def _state_path(self, committed: int) -> Path:
        return self.dir / f"state-{committed:08d}.pt"

    def _result_path(self, round_: int) -> Path:
        return self.dir / f"result-{round_:08d}.msgpack"

    def commit_round(self, row: RoundRow, state_blob: bytes, frames: dict[str, bytes],
                     members: dict[str, Member], aggregate: bytes | None = None,
                     keys: dict[str, bytes] | None = None) -> None:
        """Persist a round; raises OSError/sqlite3.Error when it did not become durable (nothing to undo then).
        ``keys``: the public keys its frames were verified with, by sender (a restored result hands them out)."""
        committed = row.round + 1
        self.disk.write_atomic(self._state_path(committed), state_blob)
        self.disk.write_atomic(self._result_path(row.round), msgpack.packb(
            {"round": row.round, "frames": frames, "aggregate": aggregate, "keys": keys or {}}, use_bin_type=True))

        def record() -> None:
            self.db.execute("INSERT OR REPLACE INTO rounds VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                            (row.round, row.committed_at, json.dumps(row.members), row.reason, row.fingerprint,
                             row.bytes_in, row.bytes_out, row.duration_s, row.mean_loss, row.val_loss, row.close))
            self._save_members(members)

        self.disk.transaction(self.db, record)  # the commit point
        # the audit trail tools read (node/roundlog.py); the round is durable whether or not these succeed now
        self.pending.append(row.to_json())
        self.flush()

    def flush(self) -> bool:
        """Append the audit lines still pending and remove old files; False (logged) when the disk still fails."""
        try:
            while self.pending:
                self.disk.append_line(self.dir / COORDINATOR_LOG, self.pending[0])
                self.pending.pop(0)
            for pattern in ("state-*.pt", "result-*.msgpack"):
                for old in sorted(self.dir.glob(pattern))[:-self.keep]:
                    self.disk.unlink(old)
        except OSError as exc:
            log.warning("state dir %s: %d audit line(s) not written yet (%s); retrying at the next write", self.dir,
                        len(self.pending), exc)
            return False
        return True

    def set_val_loss(self, round_: int, val_loss: float) -> None:
        self.disk.transaction(self.db, lambda: self.db.execute("UPDATE rounds SET val_loss = ? WHERE round = ?",
                                                               (val_loss, round_)))
        self.pending.append(json.dumps({"round": round_, "val_loss": val_loss}))
        self.flush()

    def latest(self) -> tuple[int, bytes | None]:
        """(committed rounds, state blob) of the last committed round; (0, None) for a new run."""
        row = self.db.execute("SELECT MAX(round) FROM rounds").fetchone()
        if row[0] is None:
            return 0, None
        committed = int(row[0]) + 1
        return committed, self._state_path(committed).read_bytes()

    def result(self, round_: int) -> dict[str, bytes] | None:
        path = self._result_path(round_)
        if not path.exists():
            return None
        return msgpack.unpackb(path.read_bytes(), raw=False)["frames"]

    def aggregate(self, round_: int) -> bytes | None:
        """The aggregate frame of a round committed in aggregate mode (None in relay mode)."""
        path = self._result_path(round_)
        if not path.exists():
            return None
        return msgpack.unpackb(path.read_bytes(), raw=False).get("aggregate")

    def result_keys(self, round_: int) -> dict[str, bytes] | None:
        """The keys a round's frames were verified with, by sender; None when not held (a result file from before
        they were stored)."""
        path = self._result_path(round_)
        keys = msgpack.unpackb(path.read_bytes(), raw=False).get("keys") if path.exists() else None
        return {str(n): bytes(k) for n, k in keys.items()} if isinstance(keys, dict) else None

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
