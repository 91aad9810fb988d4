"""A user-space emulated network link: a TCP relay that delays, throttles, stalls and cuts what passes through.

This kernel has no ``netem``, so latency, jitter, loss and outages are emulated here; bandwidth can also be
shaped by the kernel (``tc tbf`` in a network namespace, ``netns.py``), and this relay then only adds the rest.

One ``Link`` is one machine's access link: every TCP connection a node opens through it shares its token
buckets (one per direction: ``up`` = client → server, ``down`` = server → client), so a node's uploads compete
with each other as on a real uplink.

How each effect is made, per direction, on the byte stream (TCP, so nothing is ever reordered or lost):
- bandwidth: a token bucket at ``rate_bps`` (burst = 1/50 s of traffic, at least 16 KiB): a chunk leaves once
  the bucket holds its bytes;
- latency + jitter: a chunk read at t is released at max(t + one-way latency + U(−jitter, +jitter), the
  previous chunk's release) — order is kept, as TCP keeps it;
- loss: TCP turns a lost segment into a retransmission stall. Each 1448-byte segment is lost with
  probability ``loss``; a chunk holding a lost one is held back one retransmission timeout
  (max(0.2 s, 2 × RTT), Linux's minimum RTO); the bytes still arrive;
- outages (``outage_every_s``/``outage_s``, or ``set_down``): while down, nothing moves in either direction
  (a black hole: connections stay open, as across a flapping home router); ``cut()`` resets every open
  connection at once (a partition that a NAT box turns into RSTs).

The relay counts the bytes that entered each direction: that is what a node put on its wire (payload,
framing, gRPC/HTTP2 and TCP-stream overhead above IP), the figure ``bench network`` compares to the codec's
formula.
"""
from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
SEGMENT = 1448  # TCP payload bytes per segment on a 1500-byte MTU path with timestamps
READ = 64 << 10


@dataclass(frozen=True)
class LinkProfile:
    """One access link. Rates in bits/s (0 = unlimited), times in seconds, loss as a probability per segment."""

    name: str = "custom"
    up_bps: float = 0.0
    down_bps: float = 0.0
    latency_s: float = 0.0  # one way
    jitter_s: float = 0.0
    loss: float = 0.0
    outage_every_s: float = 0.0  # 0: no periodic outages
    outage_s: float = 0.0

    def __post_init__(self) -> None:
        for field_name in ("up_bps", "down_bps", "latency_s", "jitter_s", "outage_every_s", "outage_s"):
            if getattr(self, field_name) < 0:
                raise ValueError(f"link profile {self.name}: {field_name} must be ≥ 0")
        if not 0 <= self.loss < 1:
            raise ValueError(f"link profile {self.name}: loss must be in [0, 1), got {self.loss}")
        if self.outage_every_s and not 0 < self.outage_s < self.outage_every_s:
            raise ValueError(f"link profile {self.name}: need 0 < outage_s < outage_every_s")

    @property
    def rto_s(self) -> float:
        return max(0.2, 4 * self.latency_s)  # 2 × RTT, RTT = 2 × one-way latency


class _Bucket:
    """A token bucket in bytes, shared by every connection of a link direction."""

    def __init__(self, rate_bps: float) -> None:
        self.rate = rate_bps / 8.0  # bytes/s; 0 = unlimited
        self.burst = max(16 << 10, self.rate / 50)
        self.tokens = self.burst
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        async with self.lock:  # FIFO across connections: a big transfer cannot starve the others forever
            while True:
                now = time.monotonic()
                self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= n or (n > self.burst and self.tokens >= self.burst):
                    self.tokens -= n  # may go negative for a chunk larger than the burst: paid back by waiting
                    return
                await asyncio.sleep((min(n, self.burst) - self.tokens) / self.rate)


class Link:
    """A relay from ``listen`` (127.0.0.1 or a namespace address, port 0 = any) to ``target``, shaped by
    ``profile``. Runs its own event loop thread; ``start()`` returns the bound port."""

    def __init__(self, target: tuple[str, int], profile: LinkProfile, *, listen_host: str = "127.0.0.1",
                 seed: int = 0, name: str = "") -> None:
        self.target, self.profile, self.listen_host = target, profile, listen_host
        self.name = name or f"link→{target[0]}:{target[1]}"
        self.rng = random.Random(seed)
        self.bytes_up = 0
        self.bytes_down = 0
        self.port = 0
        self._down_until = 0.0
        self._forced_down = False
        self._started = time.monotonic()
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=self.name, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._buckets: dict[str, _Bucket] = {}

    # -- control --------------------------------------------------------------------------------------------
    def start(self) -> int:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self.port

    async def _start(self) -> int:
        self._buckets = {"up": _Bucket(self.profile.up_bps), "down": _Bucket(self.profile.down_bps)}
        self._server = await asyncio.start_server(self._accept, self.listen_host, self.port)
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.port}"

    def set_down(self, down: bool) -> None:
        """Black-hole the link (both directions) until ``set_down(False)``."""
        self._forced_down = down

    def cut(self) -> None:
        """Reset every open connection now (new ones still go through)."""
        def reset() -> None:
            for w in list(self._writers):
                transport = w.transport
                transport.abort()
        self._loop.call_soon_threadsafe(reset)

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.transport.abort()
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def stats(self) -> dict[str, Any]:
        return {"link": self.name, "profile": self.profile.name, "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down}

    # -- the relay ------------------------------------------------------------------------------------------
    def is_down(self, now: float) -> bool:
        p = self.profile
        if self._forced_down:
            return True
        if p.outage_every_s:
            phase = (now - self._started) % p.outage_every_s
            return phase >= p.outage_every_s - p.outage_s
        return False

    async def _wait_up(self) -> None:
        while self.is_down(time.monotonic()):
            await asyncio.sleep(0.02)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError as exc:
            log.debug("%s: upstream connect failed: %r", self.name, exc)
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(self._pump(reader, up_writer, "up"), self._pump(up_reader, writer, "down"))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort() if w.transport.is_closing() is False else None

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str) -> None:
        """Read, then release each chunk after bandwidth, latency, jitter and loss stalls, in order."""
        p, bucket = self.profile, self._buckets[direction]
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                release, data = item
                delay = release - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._wait_up()
                dst.write(data)
                await dst.drain()

        sender = asyncio.ensure_future(deliver())
        last_release = 0.0
        try:
            while True:
                await self._wait_up()
                data = await src.read(READ)
                if not data:
                    break
                if direction == "up":
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                await bucket.take(len(data))  # serialisation on the link: the sender feels it (backpressure)
                delay = p.latency_s + (self.rng.uniform(-p.jitter_s, p.jitter_s) if p.jitter_s else 0.0)
                if p.loss:
                    segments = -(-len(data) // SEGMENT)
                    if self.rng.random() < 1 - (1 - p.loss) ** segments:
                        delay += p.rto_s
                last_release = max(time.monotonic() + max(0.0, delay), last_release)
                await queue.put((last_release, data))
        except (ConnectionError, OSError):
            pass
        finally:
            await queue.put(None)
            try:
                await sender
            except (ConnectionError, OSError):
                pass
            try:
                dst.write_eof()
            except (OSError, RuntimeError, AttributeError):
                pass
