"""The frames of recent rounds, addressed by (round, sha256), served to peers and pulled from them.

A frame is named by its digest, not by its sender, because a sender can submit more than one frame for a round
(it retries a round it could not commit: new inner steps, a new frame) while the others may already have
committed its first one. Agreement is therefore over exact (sender, sha256) pairs, and any peer that holds a
frame — its sender, or anyone who fetched it — serves it, so a round decided with a frame whose sender has
died can still be reduced by a peer that missed it.

Stream protocol (handler ``lowband.{run}.frame``): request = round (8 bytes, big-endian) + sha256 (32 raw bytes);
answer = status byte (0: found, 1: not held) + the frame as length-prefixed raw data.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Sequence

from hivemind.p2p import P2P, PeerID

log = logging.getLogger(__name__)
_OK, _MISSING = b"\x00", b"\x01"
KEEP_OWN_ROUNDS = 8  # our own frames, served this many rounds back (a paused or slow peer may still want them)
KEEP_FETCHED_ROUNDS = 2  # frames fetched from others: the round being decided and the one before

Pair = tuple[str, str]  # (sender, sha256 hex)
MAX_FRAME = 4 << 30  # the most a fetch of a frame of unknown size accepts (an announced size bounds it exactly)
PIECE = 1 << 16


async def send_moving(data: bytes, writer: asyncio.StreamWriter, idle_s: float) -> None:
    """``P2P.send_raw_data``, bounded by progress: each piece must drain within ``idle_s``, so a large frame on a
    slow uplink is sent to the end while a stalled stream fails."""
    writer.write(len(data).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
    view = memoryview(data)
    for offset in range(0, len(view), PIECE):
        writer.write(view[offset:offset + PIECE])
        await asyncio.wait_for(writer.drain(), idle_s)
    await asyncio.wait_for(writer.drain(), idle_s)


async def receive_moving(reader: asyncio.StreamReader, idle_s: float, limit: int) -> bytes:
    """``P2P.receive_raw_data``, bounded by progress (``idle_s`` per read) and by ``limit`` bytes."""
    header = await asyncio.wait_for(reader.readexactly(P2P.HEADER_LEN), idle_s)
    length = int.from_bytes(header, P2P.BYTEORDER)
    if length > limit:
        raise ValueError(f"a frame of {length} bytes, more than the {limit} expected")
    buf = bytearray()
    while len(buf) < length:
        piece = await asyncio.wait_for(reader.read(min(16 * PIECE, length - len(buf))), idle_s)
        if not piece:
            raise asyncio.IncompleteReadError(bytes(buf), length)
        buf += piece
    return bytes(buf)


async def request_moving(p2p: P2P, peer_id: str, handler: str, request: bytes, idle_s: float,
                         limit: int) -> tuple[bytes, bytes]:
    """Ask ``peer_id``'s stream ``handler``: send ``request``, read (status byte, length-prefixed answer). Every
    step must move within ``idle_s`` (the whole may take longer: a large answer on a slow link); the answer is
    bounded by ``limit`` bytes."""
    _info, reader, writer = await asyncio.wait_for(
        p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), handler), idle_s)
    try:
        await asyncio.wait_for(P2P.send_raw_data(request, writer), idle_s)
        status = await asyncio.wait_for(reader.readexactly(1), idle_s)
        return status, await receive_moving(reader, idle_s, limit)
    finally:
        writer.close()


def digest(frame: bytes) -> str:
    return hashlib.sha256(frame).hexdigest()


def parse_pairs(value: Any) -> frozenset[Pair] | None:
    """A have-list / outcome as stored in the DHT (a list of [sender, sha256]); None when malformed."""
    if not isinstance(value, (list, tuple)):
        return None
    pairs = set()
    for item in value:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            return None
        pairs.add((item[0], item[1]))
    return frozenset(pairs)


@dataclass(frozen=True)
class HaveList:
    """A member's have-list: the frames it fetched and verified (``held``) out of those of ``group``, the senders
    it took into the round. ``group`` tells the others whether a missing frame was tried and failed (a drop) or
    belongs to a sender this member has not heard of yet (it will learn of it from their lists and try)."""

    held: frozenset[Pair]
    group: frozenset[str]

    def encode(self) -> list[Any]:
        return [sorted([s, sha] for s, sha in self.held), sorted(self.group)]

    @classmethod
    def parse(cls, value: Any) -> "HaveList | None":
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[1], (list, tuple))
                and all(isinstance(n, str) for n in value[1])):
            return None
        held = parse_pairs(value[0])
        return None if held is None else cls(held, frozenset(value[1]))


@dataclass
class Outcome:
    """A peer's record of how a round ended: ``committed`` with exactly ``pairs``, from reference ``fingerprint``.
    ``sources``: publisher → peer id of every peer that published this same outcome (each holds its frames)."""

    publisher: str
    peer_id: str
    fingerprint: str
    published_at: float
    committed: bool
    pairs: frozenset[Pair]
    sources: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, publisher: str, value: Any) -> "Outcome | None":
        if not (isinstance(value, (list, tuple)) and len(value) == 5):
            return None
        peer_id, fingerprint, published_at, committed, raw = value
        pairs = parse_pairs(raw)
        if not (isinstance(peer_id, str) and isinstance(fingerprint, str) and isinstance(published_at, (int, float))
                and isinstance(committed, bool) and pairs is not None):
            return None
        return cls(publisher, peer_id, fingerprint, float(published_at), committed, pairs, {publisher: peer_id})


def well_formed(announcement: Any) -> bool:
    """(peer_id, size, sha256, fingerprint), as ``DhtTransport.submit`` stores it."""
    return (isinstance(announcement, (list, tuple)) and len(announcement) == 4 and isinstance(announcement[0], str)
            and isinstance(announcement[1], int) and all(isinstance(x, str) for x in announcement[2:]))


def same_reference(mine: str, announced: dict[str, Any], where: str) -> tuple[dict[str, Any], str]:
    """Keep the members whose reference (announced fingerprint, ``announced[s][3]``) equals ours, ``mine``. If
    another reference is held by more members (ties: the larger fingerprint string), ours is the diverged one:
    ({}, why) tells the caller to fetch the state. Every member applies the same rule to the same announcements,
    so a diverged replica is left out by the others exactly when it leaves itself out."""
    groups: dict[str, set[str]] = {}
    for sender, v in announced.items():
        groups.setdefault(v[3], set()).add(sender)
    if not mine or set(groups) <= {mine, ""}:
        return announced, ""
    checked = {fp: members for fp, members in groups.items() if fp}
    best = max(checked.items(), key=lambda kv: (len(kv[1]), kv[0]))[0]
    if best != mine:
        return {}, (f"this replica's reference {mine} differs from the run's {best} "
                    f"(held by {len(checked[best])} members): fetching the state")
    keep = {s: v for s, v in announced.items() if v[3] in (mine, "")}
    for sender in sorted(set(announced) - set(keep)):
        log.warning("%s dropped %s: its reference %s differs from ours %s (a diverged replica)", where, sender,
                    announced[sender][3], mine)
    return keep, ""


class FramePool:
    def __init__(self, name: str, handler_name: str, fetch_timeout_s: float) -> None:
        self.name, self.handler_name, self.fetch_timeout_s = name, handler_name, fetch_timeout_s
        self._frames: dict[int, dict[str, bytes]] = {}  # round → sha256 → frame (ours and fetched)
        self._own: dict[int, dict[str, bytes]] = {}  # round → sha256 → frame, every frame we submitted
        self._latest: dict[int, str] = {}  # round → sha256 of our latest submission (the announced one)
        self.served: dict[int, int] = {}  # round → bytes streamed to peers
        self._lock = threading.Lock()

    # -- holding ----------------------------------------------------------------------------------------
    def add_own(self, round_: int, frame: bytes) -> str:
        sha = digest(frame)
        with self._lock:
            self._own.setdefault(round_, {})[sha] = frame
            self._frames.setdefault(round_, {})[sha] = frame
            self._latest[round_] = sha
            self._prune(round_)
        return sha

    def add(self, round_: int, frame: bytes) -> str:
        sha = digest(frame)
        with self._lock:
            self._frames.setdefault(round_, {})[sha] = frame
        return sha

    def get(self, round_: int, sha: str) -> bytes | None:
        with self._lock:
            return self._frames.get(round_, {}).get(sha)

    def latest_own(self, round_: int) -> tuple[str, bytes] | None:
        with self._lock:
            sha = self._latest.get(round_)
            return None if sha is None else (sha, self._own[round_][sha])

    def replace(self, round_: int, sha: str, frame: bytes) -> None:
        """Serve other bytes under ``sha`` (tests: a peer whose frame no longer matches its announcement)."""
        with self._lock:
            self._frames[round_][sha] = frame
            if sha in self._own.get(round_, {}):
                self._own[round_][sha] = frame

    def _prune(self, newest: int) -> None:
        for r in [r for r in self._frames if r <= newest - KEEP_FETCHED_ROUNDS]:
            own = self._own.get(r, {})
            self._frames[r] = {s: f for s, f in self._frames[r].items() if s in own}
        for r in [r for r in set(self._frames) | set(self._own) if r <= newest - KEEP_OWN_ROUNDS]:
            for table in (self._frames, self._own, self._latest, self.served):
                table.pop(r, None)

    # -- serving ----------------------------------------------------------------------------------------
    async def serve(self, _info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await receive_moving(reader, self.fetch_timeout_s, 40)
            if len(request) != 40:  # (longer ones were refused unread)
                raise ValueError(f"a frame request is 40 bytes (round + sha256), got {len(request)}")
            round_, sha = int.from_bytes(request[:8], "big"), request[8:].hex()
            with self._lock:
                frame = self._frames.get(round_, {}).get(sha)
                if frame is not None:
                    self.served[round_] = self.served.get(round_, 0) + len(frame)
            writer.write(_MISSING if frame is None else _OK)
            await send_moving(frame or b"", writer, self.fetch_timeout_s)
            # closing our end at once can cut the frame short in p2pd: hold the stream until the caller
            # has read it and closed (as hivemind's own handlers do), bounded
            await asyncio.wait_for(reader.read(1), self.fetch_timeout_s)
        except Exception as exc:
            log.debug("[node=%s] serving a frame failed: %r", self.name, exc)
        finally:
            writer.close()

    # -- fetching ---------------------------------------------------------------------------------------
    async def _fetch(self, p2p: P2P, peer_id: str, round_: int, sha: str, size: int | None) -> bytes:
        status, data = await request_moving(p2p, peer_id, self.handler_name,
                                            round_.to_bytes(8, "big") + bytes.fromhex(sha), self.fetch_timeout_s,
                                            MAX_FRAME if size is None else size)
        if status != _OK:
            raise LookupError("peer holds no such frame for this round")
        return data

    async def fetch_one(self, p2p: P2P, round_: int, sender: str, sources: Sequence[str], size: int | None,
                        sha: str, timeout: float, longest: float | None = None) -> bytes | str:
        """The frame ``sha`` from the first of ``sources`` (peer ids) that serves it, or the reason it could not
        be had. Each stream must keep moving (``fetch_timeout_s`` per step); a transfer that does may run until
        ``longest`` (default ``timeout``). A broken stream is retried within ``timeout``: one cut stream must
        not drop a peer, and a dead one must not hold the round."""
        held = self.get(round_, sha)
        if held is not None:
            return held
        now = time.monotonic()
        until, last = now + timeout, now + max(timeout, longest or 0.0)
        why = "no source"
        for peer_id in dict.fromkeys(sources):  # in order, without repeats
            while True:
                try:
                    data = await asyncio.wait_for(self._fetch(p2p, peer_id, round_, sha, size),
                                                  max(0.05, last - time.monotonic()))
                except asyncio.TimeoutError:
                    return f"no frame within {timeout:.1f}s (a step stalled, or the round's time ran out)"
                except LookupError as exc:  # a definite answer: this source does not hold it
                    why = f"fetch failed: {exc}"
                    break
                except Exception as exc:
                    why = f"fetch failed: {exc!r}"
                    if time.monotonic() + 0.2 >= until:
                        return why
                    log.info("[node=%s round=%d] fetching %s failed (%r); retrying", self.name, round_, sender, exc)
                    await asyncio.sleep(0.1)
                    continue
                if (size is not None and len(data) != size) or digest(data) != sha:
                    return (f"frame does not match its announcement (size {len(data)} vs {size}, sha256 "
                            f"mismatch)")
                self.add(round_, data)
                return data
        return why

    async def fetch_all(self, p2p: P2P, round_: int,
                        wanted: dict[str, tuple[Sequence[str], int | None, str]],
                        timeout: float, longest: float | None = None) -> dict[str, bytes | str]:
        """sender → frame, or → the reason it was dropped; ``wanted``: sender → (sources, size, sha256)."""
        senders = sorted(wanted)
        jobs: list[Awaitable[bytes | str]] = [self.fetch_one(p2p, round_, s, *wanted[s], timeout=timeout,
                                                             longest=longest) for s in senders]
        got = await asyncio.gather(*jobs)
        return dict(zip(senders, got))

