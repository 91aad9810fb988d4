"""Snapshots of the coordinator's state, written off the commit path, tensor by tensor, while rounds keep committing.

The file is the state format of docs/state.md (node/train/state_file.py): a safetensors file with lowband's JSON
header. ``safetensors.torch.save_file`` would first copy every tensor into one bytes object (a second copy of the
whole state); here the layout is computed from the header alone (data in tensor-name order) and each tensor is
written straight from its memory with ``pwrite`` at its offset. ``tensors_sha256`` is only known once every tensor
is on disk: the header is written with a placeholder of the same length, the data is read back (page cache) and
hashed, and the digest is written in place. Then fsync, rename, fsync of the folder — a reader sees a complete
snapshot or none.

Consistency with rounds that commit meanwhile (per-tensor copy-on-write): the writer holds the *live* tensors of
one committed round (``Reference.state(copy=False)``). Before the next outer step changes them in place, the commit
calls ``freeze``: every tensor not written yet is cloned (within ``clone_budget`` bytes, by default the largest
tensor) or, past the budget, written at once by the committing thread. The file therefore holds exactly the round
it was started at, and the extra memory is at most the budget; the cost of a snapshot that is still running when
the next round commits moves onto that commit (choose ``rounds.snapshot_every`` so a snapshot ends between rounds).
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from coordinator.errors import Cancelled
from node import wire
from node.train import state_file

log = logging.getLogger(__name__)
PLACEHOLDER = "~" * 64  # as long as a sha256 hex digest: replaced in place once the data is written
READ_CHUNK = 8 << 20  # bytes read back per call while hashing
CANCEL_POLL_S = 0.2  # how often a joiner's wait for a snapshot looks whether its call went away


@dataclass
class Slot:
    """One tensor of the snapshot: where it goes and what to write (the live tensor, or a clone once frozen)."""

    key: str
    source: torch.Tensor | None  # None once written
    start: int  # absolute offset in the file
    nbytes: int
    frozen: bool = False  # ``source`` is a clone made by ``freeze``, no longer the live tensor


def raw_view(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (contiguous C order; shape [numel × itemsize] as uint8)."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def layout(tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any]) -> tuple[bytes, list[Slot]]:
    """The file's first bytes (u64 length, the safetensors JSON header padded to 8 bytes) with ``tensors_sha256``
    left as ``PLACEHOLDER``, and one ``Slot`` per tensor (data in name order, as ``state_file`` hashes it).
    Raises ValueError for a header JSON cannot carry exactly (NaN, ±inf)."""
    meta = json.dumps({"format": state_file.FORMAT, "version": state_file.VERSION, **header,
                       "tensors_sha256": PLACEHOLDER}, sort_keys=True, separators=(",", ":"), allow_nan=False)
    entries: dict[str, Any] = {"__metadata__": {state_file.META_KEY: meta}}
    at, spans = 0, []
    for key in sorted(tensors):
        t = tensors[key]
        nbytes = t.numel() * t.element_size()
        entries[key] = {"dtype": wire.CODE_OF[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + nbytes]}
        spans.append((key, at, nbytes))
        at += nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # safetensors pads its header so that the data is 8-byte aligned
    head = len(text).to_bytes(8, "little") + text
    if head.count(PLACEHOLDER.encode()) != 1:
        raise ValueError("a tensor name holds the snapshot's digest placeholder")
    return head, [Slot(key, tensors[key], len(head) + start, nbytes) for key, start, nbytes in spans]


class Snapshot:
    """One snapshot being written to ``path`` (through ``disk``, the store's seam): ``write`` runs on the writer
    thread; ``freeze`` on the committing thread before an outer step changes the live tensors in place."""

    def __init__(self, disk: Any, path: Path, committed: int, tensors: Mapping[str, torch.Tensor],
                 header: Mapping[str, Any], clone_budget: int | None = None) -> None:
        self.disk, self.path, self.committed = disk, path, committed
        self.head, self.slots = layout(tensors, header)
        self.budget = max((s.nbytes for s in self.slots), default=0) if clone_budget is None else clone_budget
        self.cloned = 0  # bytes held in clones right now
        self.frozen = (0, 0)  # tensors ``freeze`` (cloned, wrote): a commit came while the snapshot was written
        self.lock = threading.Lock()  # held while a slot is written or frozen: a tensor is never changed mid-write
        self.file: Any = None
        self.done = threading.Event()
        self.freezing = threading.Event()  # set once a commit came to ``freeze`` (tests synchronise on it)
        self.no_freeze_waiting = threading.Event()  # cleared while a commit waits for the lock: the writer yields
        self.no_freeze_waiting.set()
        self.error: BaseException | None = None

    def _write_slot(self, slot: Slot) -> None:
        assert slot.source is not None
        view = raw_view(slot.source)
        for at in range(0, slot.nbytes, READ_CHUNK):
            self.disk.pwrite(self.file, view[at:at + READ_CHUNK], slot.start + at)
        if slot.frozen:
            self.cloned -= slot.nbytes
        slot.source = None

    def freeze(self) -> None:
        """Make the snapshot independent of the live tensors: clone each unwritten one within the budget, write
        the others now. Called before every in-place outer step while the snapshot runs; a no-op once it is
        frozen or done."""
        self.freezing.set()
        self.no_freeze_waiting.clear()  # the writer lets go after the tensor it is writing (a Lock is not fair)
        try:
            self._freeze()
        except Exception as exc:  # noqa: BLE001 — the commit goes on: this snapshot is abandoned, not the round
            log.error("abandoning the snapshot of %d rounds: %s: %s", self.committed, type(exc).__name__, exc)
            with self.lock:
                self.error = exc
                for slot in self.slots:
                    slot.source = None  # the writer must not read a live tensor once the step changes it
        finally:
            self.no_freeze_waiting.set()

    def _freeze(self) -> None:
        with self.lock:
            if self.done.is_set() or self.error is not None:
                return
            if self.file is None:  # not started yet: open it here, the writer thread finds it open
                self.file = self.disk.open_tmp(self.path)
                self.disk.pwrite(self.file, self.head, 0)
            cloned = written = 0
            for slot in reversed(self.slots):  # clones for the last ones (written last), the first ones now
                if slot.source is not None and not slot.frozen and self.cloned + slot.nbytes <= self.budget:
                    slot.source, slot.frozen = slot.source.clone(), True
                    self.cloned += slot.nbytes
                    cloned += 1
            for slot in self.slots:
                if slot.source is not None and not slot.frozen:
                    self._write_slot(slot)
                    written += 1
            self.frozen = (self.frozen[0] + cloned, self.frozen[1] + written)
            if cloned or written:
                log.info("a round committed while the snapshot of %d rounds was written: %d tensor(s) cloned, %d "
                         "written by the commit", self.committed, cloned, written)

    def write(self) -> None:
        """Write every slot, hash the data back, write the digest, fsync and rename. Raises what the disk raised
        (the temporary file is removed)."""
        try:
            with self.lock:
                if self.file is None:
                    self.file = self.disk.open_tmp(self.path)
                    self.disk.pwrite(self.file, self.head, 0)
            for slot in self.slots:
                self.no_freeze_waiting.wait()
                with self.lock:
                    if self.error is not None:
                        raise self.error
                    if slot.source is not None:
                        self._write_slot(slot)
            digest = self._digest()
            at = self.head.index(PLACEHOLDER.encode())
            with self.lock:
                if self.error is not None:
                    raise self.error
                self.disk.pwrite(self.file, digest.encode(), at)
                self.disk.publish(self.file, self.path)  # fsync, rename, fsync the folder
                self.file = None
        except BaseException as exc:
            with self.lock:
                self.error = exc
                if self.file is not None:
                    self.disk.discard(self.file, self.path)
                    self.file = None
            raise
        finally:
            with self.lock:
                for slot in self.slots:
                    slot.source = None  # drop references to live tensors and clones alike
                self.cloned = 0
            self.done.set()

    def _digest(self) -> str:
        """``tensors_sha256`` (node/train/state_file.py ``_digest``) over the data as written, read back in name
        order — the order the slots lie in."""
        h = hashlib.sha256()
        for slot in self.slots:
            h.update(slot.key.encode() + b"\0")
            for at in range(0, slot.nbytes, READ_CHUNK):
                h.update(self.disk.pread(self.file, min(READ_CHUNK, slot.nbytes - at), slot.start + at))
            h.update(b"\0")
        return h.hexdigest()


def read_fingerprint(path: Path) -> tuple[int, str]:
    """(committed rounds, fingerprint) from a state file's header, reading the header only. Raises OSError,
    StateFormatError."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= 64 << 20:
            raise state_file.StateFormatError(f"{path.name}: not a state file (header of {n} bytes)")
        try:
            meta = json.loads(json.loads(f.read(n))["__metadata__"][state_file.META_KEY])
            return int(meta["committed_rounds"]), str(meta["fingerprint"])
        except (ValueError, KeyError, TypeError) as exc:
            raise state_file.StateFormatError(f"{path.name}: no lowband header ({exc})") from None


class Snapshotter:
    """Takes the coordinator's snapshots on a background thread, one at a time: every ``every`` committed rounds,
    and on demand for a joiner (``for_joiner``). The committing thread calls ``freeze`` before every in-place step.

    ``store``: where snapshots go (its ``disk``, ``snapshot_path``, ``latest_snapshot``, ``prune``); ``lock``: the
    coordinator's lock, held while the store is pruned after a snapshot (the store's connection is shared)."""

    def __init__(self, store: Any, every: int, lock: Any) -> None:
        self.store, self.every, self.lock = store, every, lock
        self.current: Snapshot | None = None
        self.thread: threading.Thread | None = None
        self.failures = 0
        self.clone_budget: int | None = None  # bytes ``freeze`` may clone (None: the largest tensor's size)
        self._fingerprints: dict[Path, tuple[int, str]] = {}
        self.forced_at: int | None = None  # rounds of the last snapshot taken for a member's ``at_least`` alone

    @property
    def busy(self) -> bool:
        return self.current is not None and not self.current.done.is_set()

    def due(self, committed: int) -> bool:
        """Whether the state after ``committed`` rounds should be snapshotted now: ``every`` rounds or more after the
        newest complete snapshot, and none is being written."""
        return not self.busy and committed - self.store.latest_snapshot()[0] >= self.every

    def start(self, reference: Any, fingerprint: str) -> Snapshot | None:
        """Snapshot ``reference`` (live tensors, no copy; the caller holds the coordinator's lock, between two steps)
        on the writer thread; None when one is still being written."""
        if self.busy:
            return None
        header, tensors = reference.state(copy=False, fingerprint=fingerprint)
        committed = reference.committed_rounds
        snapshot = Snapshot(self.store.disk, self.store.snapshot_path(committed), committed, tensors, header,
                            self.clone_budget)
        self.current = snapshot
        self.thread = threading.Thread(target=self._run, args=(snapshot,), name="lowband-snapshot", daemon=True)
        self.thread.start()
        return snapshot

    def _run(self, snapshot: Snapshot) -> None:
        try:
            snapshot.write()
        except BaseException as exc:  # a disk error: the next due round tries again; the WAL still holds the rounds
            self.failures += 1
            log.error("snapshot after %d committed rounds failed: %s: %s; the rounds since the last snapshot stay "
                      "in the write-ahead log", snapshot.committed, type(exc).__name__, exc)
            return
        log.info("snapshot after %d committed rounds written: %s", snapshot.committed, snapshot.path.name)
        with self.lock:
            try:
                self.store.prune()
            except OSError as exc:  # retried after the next commit (Store.flush)
                log.warning("pruning after the snapshot of %d rounds: %s", snapshot.committed, exc)

    def freeze(self) -> None:
        """Before an in-place outer step: the running snapshot stops depending on the live tensors."""
        current = self.current
        if current is not None and not current.done.is_set():
            current.freeze()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no snapshot is being written and the writer thread is done with the store; True when so."""
        thread = self.thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def fingerprint_of(self, path: Path) -> tuple[int, str]:
        if path not in self._fingerprints:
            self._fingerprints = {p: v for p, v in self._fingerprints.items() if p.exists()}
            self._fingerprints[path] = read_fingerprint(path)
        return self._fingerprints[path]

    def for_joiner(self, committed: int, max_behind: int, start: Callable[[], Snapshot | None],
                   wait_s: float, at_least: int = 0, waiter: Any = None) -> tuple[int, Path, str]:
        """(committed rounds, path, fingerprint) of the snapshot a joiner downloads: the newest complete one when it
        holds at least ``at_least`` rounds (≤ ``committed``: a member never goes back to an older state), is at most
        ``max_behind`` rounds behind ``committed`` and not the seeded model's once a round committed (the
        joiner catches up on the rounds after it from the results kept for collectors); otherwise one taken now
        (``start``: under the caller's lock) and waited for, at most ``wait_s`` seconds. Raises TimeoutError when none
        is ready then, OSError for an unreadable one, Cancelled once ``waiter.cancelled`` is true (coordinator/rounds.py
        ``Waiter``: the caller went away, its thread is not held until the snapshot ends).

        A snapshot taken only because of ``at_least`` (a newer one than a joiner would get) is taken at most once per
        ``max_behind`` rounds, whoever asks: the same rate a joiner could always force. Past that, the newest snapshot
        is served; the member then replays the rounds up to its own from their results (node/engine.py)."""
        deadline = time.monotonic() + wait_s
        while True:
            held, path = self.store.latest_snapshot()
            servable = path is not None and committed - held <= max_behind and (held > 0 or committed == 0)
            if servable and held < at_least and self.forced_at is not None and committed - self.forced_at < max_behind:
                at_least = 0  # a snapshot was forced for a member less than max_behind rounds ago: no other yet
            # a snapshot of 0 rounds is the seeded model every node builds itself: once a round committed, not served
            if servable and held >= at_least:
                try:
                    _, fingerprint = self.fingerprint_of(path)
                except FileNotFoundError:  # pruned meanwhile: a newer one exists
                    continue
                return held, path, fingerprint
            with self.lock:
                snapshot = self.current if self.busy else start()
                if servable and snapshot is not None and snapshot.committed >= at_least > held:
                    self.forced_at = snapshot.committed
            if snapshot is None:
                raise TimeoutError(f"no snapshot of the state is ready after {wait_s:.0f} s")
            while not snapshot.done.wait(max(0.0, min(CANCEL_POLL_S, deadline - time.monotonic()))):
                if waiter is not None and waiter.cancelled:
                    raise Cancelled("the caller went away while the snapshot was written")
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"no snapshot of the state is ready after {wait_s:.0f} s")
            if snapshot.error is not None:
                raise OSError(f"the snapshot for joiners failed: {snapshot.error}")
            committed = max(committed, snapshot.committed)
