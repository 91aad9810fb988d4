"""The write-ahead record of a round reduced frame by frame (coordinator/accumulate.py), written as its frames are
accepted, so the coordinator never holds the round's frames in memory: each accepted frame is appended to the
record's temporary file at once, and committing the round appends a trailer and publishes the file (fsync, rename,
fsync of the folder) — no copy of N frames at the close.

Format (version 2 of ``result-NNNNNNNN.msgpack``; version 1 is one msgpack map, coordinator/store.py), a sequence of
msgpack objects:

1. ``{"lowband-wal": 2, "round": R}``;
2. per accepted frame, in the order accepted: ``[sender, frame bytes]``;
3. the trailer ``{"members": [senders, in that order], "aggregate": bytes | None, "keys": {sender: key},
   "applied": {...}, "sha256": hex}``, where ``sha256`` is that of (the sha256 of every byte before the trailer) +
   ``msgpack.packb([members, aggregate, keys, applied])``.

A file without its trailer is a round that never committed: it stays a ``.tmp`` file, which a restart removes
(``Store.cut_tail``). Every write goes through the store's ``Disk`` (tests inject faults there).
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import msgpack

MAGIC_KEY = "lowband-wal"
VERSION = 2


def _trailer_digest(prefix: bytes, members: list[str], aggregate: bytes | None, keys: dict[str, bytes],
                    applied: dict[str, Any]) -> str:
    """``prefix``: the sha256 digest (32 bytes) of every byte before the trailer."""
    return hashlib.sha256(prefix + msgpack.packb([members, aggregate, keys, applied], use_bin_type=True)).hexdigest()


@dataclass(frozen=True)
class HeldFrame:
    """An accepted frame kept only in its round's record on disk: its size (``len``) and sha256, to tell a repeated
    upload of the same frame from a different one."""

    size: int
    sha256: bytes

    @classmethod
    def of(cls, frame: bytes) -> "HeldFrame":
        return cls(len(frame), hashlib.sha256(frame).digest())

    def __len__(self) -> int:
        return self.size

    def same_as(self, data: bytes) -> bool:
        return len(data) == self.size and hashlib.sha256(data).digest() == self.sha256


class StreamedRecord:
    """One round's record being written at ``path`` through ``disk`` (coordinator/store.py ``Disk``). Raises OSError
    from any write; a failed ``add`` leaves the file as it was before it (the next write goes at the same offset)."""

    def __init__(self, disk: Any, path: Path, round_: int) -> None:
        self.disk, self.path, self.round = disk, path, round_
        self.f: IO[bytes] | None = disk.open_tmp(path)
        self.size = 0  # bytes of header and frames written
        self.senders: list[str] = []
        self.published = False
        # its publication failed before the rename: after an fsync error what the file holds on disk is unknown (the
        # error is reported once; a second fsync succeeds over pages never written), and its frames are nowhere else
        self.damaged = False
        self._hash = hashlib.sha256()
        self._write(msgpack.packb({MAGIC_KEY: VERSION, "round": round_}, use_bin_type=True))

    def _write(self, piece: bytes) -> None:
        assert self.f is not None
        self.disk.pwrite(self.f, piece, self.size)
        self.size += len(piece)
        self._hash.update(piece)

    def add(self, sender: str, frame: bytes) -> None:
        """Append one accepted frame. Raises OSError once the record is sealed — its publication started (a commit
        that failed after it is retried as it was: a frame arriving meanwhile is refused, as after the close) or the
        coordinator stopped."""
        if sender in self.senders:
            raise ValueError(f"{sender}'s frame is in round {self.round}'s record already")
        if self.published or self.damaged or self.f is None or self.f.closed:
            raise OSError(f"round {self.round}'s record is sealed: its commit is under way")
        self._write(msgpack.packb([sender, frame], use_bin_type=True))
        self.senders.append(sender)

    def commit(self, members: list[str], aggregate: bytes | None, keys: dict[str, bytes],
               applied: dict[str, Any]) -> None:
        """Append the trailer and publish the record: durable once this returns. ``members``: the round's senders, in
        any order (every frame added counts; the trailer lists them in the order added). Retrying after an OSError
        from the trailer's write writes it again at the same place; after one from the folder's fsync (renamed) syncs
        the folder again; after one from the publication before its rename (``damaged``) raises OSError: the file's
        contents on disk are unknown, and the round's frames must be sent again. Once published, a retry does
        nothing."""
        if self.published:
            return
        if sorted(members) != sorted(self.senders):
            raise ValueError(f"round {self.round}: members {members} are not the senders of its frames")
        if self.damaged:
            raise OSError(f"round {self.round}'s record cannot be trusted since its fsync failed")
        members = list(self.senders)
        tmp = self.path.with_name(self.path.name + ".tmp")
        if self.f is None or self.f.closed:
            if not tmp.exists() and self.path.exists():  # renamed by the failed publish: only the folder sync failed
                self.disk.sync_dir(self.path.parent)  # the rename is durable only once the folder is synced
                self.published = True
                return
            self.f = open(tmp, "rb+")
        digest = _trailer_digest(self._hash.digest(), members, aggregate, keys, applied)
        trailer = msgpack.packb({"members": members, "aggregate": aggregate, "keys": keys, "applied": applied,
                                 "sha256": digest}, use_bin_type=True)
        self.disk.pwrite(self.f, trailer, self.size)
        self.f.truncate(self.size + len(trailer))
        try:
            self.disk.publish(self.f, self.path)
        except OSError:
            self.damaged = tmp.exists()  # not renamed: the fsync, or what came before the rename, failed
            raise
        self.published = True

    def discard(self) -> None:
        """The round will not commit here (the coordinator stops): remove the temporary file."""
        if self.f is not None and not self.published:
            self.disk.discard(self.f, self.path)
        self.f = None


def read_streamed(blob: bytes, round_: int) -> dict[str, Any] | None:
    """A version-2 record's ``{"frames", "aggregate", "keys", "applied"}`` (frames in the order accepted); None when
    ``blob`` is not one (a version-1 record). Raises ValueError when it is damaged or not round ``round_``'s."""
    # read from the blob in pieces, and hashed through a view: no second (or third) copy of a record of N frames
    unpacker = msgpack.Unpacker(io.BytesIO(blob), raw=False, max_buffer_size=max(len(blob), 1),
                                read_size=min(1 << 20, max(len(blob), 1)))
    try:
        head = next(unpacker)
    except (StopIteration, msgpack.UnpackException, ValueError):
        return None
    if not isinstance(head, dict) or head.get(MAGIC_KEY) != VERSION:
        return None
    if head.get("round") != round_:
        raise ValueError(f"it is round {head.get('round')!r}'s record, not round {round_}'s")
    frames: dict[str, bytes] = {}
    while True:
        start = unpacker.tell()
        try:
            obj = next(unpacker)
        except StopIteration:
            raise ValueError("it ends without its trailer") from None
        if isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], str) and isinstance(obj[1], bytes):
            if obj[0] in frames:
                raise ValueError(f"{obj[0]}'s frame is in it twice")
            frames[obj[0]] = obj[1]
            continue
        if not isinstance(obj, dict):
            raise ValueError(f"an object of type {type(obj).__name__} where a frame or the trailer belongs")
        break
    if unpacker.tell() != len(blob):
        raise ValueError("bytes follow its trailer")
    # every field's type before any use: bytes(n) of an integer n would allocate n bytes
    members, aggregate, keys, applied = obj["members"], obj.get("aggregate"), obj.get("keys") or {}, obj.get("applied")
    if not isinstance(members, list) or not all(isinstance(n, str) for n in members):
        raise ValueError("its trailer's members are not a list of names")
    if aggregate is not None and not isinstance(aggregate, bytes):
        raise ValueError(f"its trailer's aggregate is a {type(aggregate).__name__}, not bytes")
    if not isinstance(keys, dict) or not all(isinstance(n, str) and isinstance(k, bytes) for n, k in keys.items()):
        raise ValueError("its trailer's keys are not a map of names to bytes")
    if not isinstance(applied, dict):
        raise ValueError(f"its trailer's applied is a {type(applied).__name__}, not a map")
    with memoryview(blob) as view:
        prefix = hashlib.sha256(view[:start]).digest()
    want = _trailer_digest(prefix, members, aggregate, keys, applied)
    if obj.get("sha256") != want:
        raise ValueError("it does not match its checksum (damaged on disk)")
    if list(frames) != list(members):
        raise ValueError(f"its trailer lists {members}, its frames are {list(frames)}")
    return {"frames": frames, "aggregate": None if aggregate is None else bytes(aggregate), "keys": keys,
            "applied": applied}
