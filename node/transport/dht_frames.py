"""The frames of recent rounds, addressed by (round, sha256), served to peers and pulled from them.

A frame is named by its digest, not by its sender, because a sender can submit more than one frame for a round
(it retries a round it could not commit: new inner steps, a new frame) while the others may already have
committed its first one. Agreement is therefore over exact (sender, sha256) pairs, and any peer that holds a
frame — its sender, or anyone who fetched it — serves it, so a round decided with a frame whose sender has
died can still be reduced by a peer that missed it.

Stream protocol (handler ``lowband.{run}.frame``): request = round (8 bytes, big-endian) + sha256 (32 raw bytes);
answer = status byte (0: found, 1: not held) + the frame as length-prefixed raw data.

The bounds on streams are real time (``time.monotonic``, ``asyncio.wait_for``): they bound waiting on the network,
whatever clock the round's own waits are decided on (``node.clock``).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from typing import Any, Awaitable, Callable, Sequence

from hivemind.p2p import P2P, PeerID

from node.logutil import RateLimited
from node.transport.dht_faults import DhtFaults, Stream

log = logging.getLogger(__name__)
retries = RateLimited(log, every_s=5.0)  # a dead source fails at once, every time it is tried again
_OK, _MISSING = b"\x00", b"\x01"
KEEP_OWN_ROUNDS = 8  # our own frames, served this many rounds back (a paused or slow peer may still want them)
KEEP_FETCHED_ROUNDS = 2  # frames fetched from others: the round being decided and the one before

MAX_FRAME = 4 << 30  # the most a fetch of a frame of unknown size accepts (an announced size bounds it exactly)
PIECE = 1 << 16


async def send_moving(data: bytes, writer: asyncio.StreamWriter, idle_s: float,
                      before_piece: Callable[[int], Awaitable[None]] | None = None) -> None:
    """``P2P.send_raw_data``, bounded by progress: each piece must drain within ``idle_s``, so a large frame on a
    slow uplink is sent to the end while a stalled stream fails. ``before_piece(i)`` is awaited before piece ``i``
    (the fault seam's pacing and stalls)."""
    writer.write(len(data).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
    view = memoryview(data)
    for i, offset in enumerate(range(0, len(view), PIECE)):
        if before_piece is not None:
            await before_piece(i)
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


class FramePool:
    """Our frames and the ones we fetched, by round and sha256; serves them (``serve``) and pulls them (``fetch_all``).
    ``faults``: what a test wants this peer's serving to do wrong (``dht_faults``; none by default); ``request``: how
    a frame is asked of a peer (``request_moving``; a test's network seam)."""

    def __init__(self, name: str, handler_name: str, fetch_timeout_s: float, faults: DhtFaults | None = None,
                 request: Callable[..., Awaitable[tuple[bytes, bytes]]] = request_moving) -> None:
        self.name, self.handler_name, self.fetch_timeout_s = name, handler_name, fetch_timeout_s
        self.faults = faults or DhtFaults()
        self.request = request
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
                frame = None if self.faults.refuses(Stream.FRAME) else self._frames.get(round_, {}).get(sha)
                if frame is not None:
                    self.served[round_] = self.served.get(round_, 0) + len(frame)
            writer.write(_MISSING if frame is None else _OK)
            await send_moving(self.faults.served(Stream.FRAME, frame or b""), writer, self.fetch_timeout_s,
                              lambda i: self.faults.before_piece(Stream.FRAME, i))
            # closing our end at once can cut the frame short in p2pd: hold the stream until the caller
            # has read it and closed (as hivemind's own handlers do), bounded
            await asyncio.wait_for(reader.read(1), self.fetch_timeout_s)
        except Exception as exc:
            log.debug("[node=%s] serving a frame failed: %r", self.name, exc)
        finally:
            writer.close()

    # -- fetching ---------------------------------------------------------------------------------------
    async def _fetch(self, p2p: P2P, peer_id: str, round_: int, sha: str, size: int | None) -> bytes:
        status, data = await self.request(p2p, peer_id, self.handler_name,
                                            round_.to_bytes(8, "big") + bytes.fromhex(sha), self.fetch_timeout_s,
                                            MAX_FRAME if size is None else size)
        if status != _OK:
            raise LookupError("peer holds no such frame for this round")
        return data

    async def fetch_one(self, p2p: P2P, round_: int, sender: str, sources: Sequence[str], size: int | None,
                        sha: str, timeout: float, longest: float | None = None) -> bytes | str:
        """The frame ``sha`` from the first of ``sources`` (peer ids) that serves it, or the reason it could not
        be had. Each stream must keep moving (``fetch_timeout_s`` per step); a transfer that does may run until
        ``longest`` (default ``timeout``). A broken stream or a peer that cannot be reached moves on to the next
        source, and the sources are tried again in turn within ``timeout``: one cut stream must not drop a peer, and
        a dead one — the frame's sender, say — must not keep us from the others that hold the frame."""
        held = self.get(round_, sha)
        if held is not None:
            return held
        now = time.monotonic()
        until, last = now + timeout, now + max(timeout, longest or 0.0)
        why = "no source"
        order, lacking = list(dict.fromkeys(sources)), set()  # in order, without repeats; those without the frame
        while True:
            for peer_id in [p for p in order if p not in lacking]:
                try:
                    data = await asyncio.wait_for(self._fetch(p2p, peer_id, round_, sha, size),
                                                  max(0.05, last - time.monotonic()))
                except asyncio.TimeoutError:
                    return f"no frame within {timeout:.1f}s (a step stalled, or the round's time ran out)"
                except LookupError as exc:  # a definite answer: this source does not hold it
                    why = f"fetch failed: {exc}"
                    lacking.add(peer_id)
                    continue
                except Exception as exc:
                    why = f"fetch failed: {exc!r}"
                    retries.log(logging.INFO, f"{round_}:{sender}", "[node=%s round=%d] fetching %s from %s failed "
                                "(%r); trying the next source", self.name, round_, sender, peer_id[-8:], exc)
                    continue
                if (size is not None and len(data) != size) or digest(data) != sha:
                    return (f"frame does not match its announcement (size {len(data)} vs {size}, sha256 "
                            f"mismatch)")
                self.add(round_, data)
                return data
            if len(lacking) == len(order) or time.monotonic() + 0.2 >= until:
                return why
            await asyncio.sleep(0.1)

    async def fetch_all(self, p2p: P2P, round_: int,
                        wanted: dict[str, tuple[Sequence[str], int | None, str]],
                        timeout: float, longest: float | None = None) -> dict[str, bytes | str]:
        """sender → frame, or → the reason it was dropped; ``wanted``: sender → (sources, size, sha256)."""
        senders = sorted(wanted)
        jobs: list[Awaitable[bytes | str]] = [self.fetch_one(p2p, round_, s, *wanted[s], timeout=timeout,
                                                             longest=longest) for s in senders]
        got = await asyncio.gather(*jobs)
        return dict(zip(senders, got))

