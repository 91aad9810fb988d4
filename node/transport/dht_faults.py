"""The DHT transport's fault seam: faults a test asks of one peer's bounded DHT access (``dht_records``) and of its
stream servers (``dht_frames`` for frames, ``dht_state`` for state chunks), so tests drive the failure paths of a
real peer — a lookup that fails on a lossy link, a slow or stalled uplink, a peer serving other bytes than it
announced, a donor that lost its snapshot — without replacing any of its methods.

Every ``DhtTransport`` holds one (``DhtTransport.create(..., faults=...)``); the default schedules nothing and the
code that consults it then behaves exactly as without it. A test schedules faults before or during a round;
``fired`` lists what was injected, in order, so the test can wait for a fault to happen and check that it did.

This sits below ``node/transport/faults.py`` (which wraps a whole ``ControlPlane`` and so cannot reach a read or a
stream inside one round).
"""
from __future__ import annotations

import asyncio
import enum
import logging
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)


class Stream(str, enum.Enum):
    """The stream handlers a peer serves."""

    FRAME = "frame"  # frames of recent rounds (dht_frames)
    STATE = "state"  # chunks of a state snapshot (dht_state)
    SLICE = "slice"  # slices of this peer's frames, for the owners of a sharded round's shards (dht_sharded)


@dataclass
class _Serving:
    pace_s: float = 0.0  # a pause before every piece: a slow uplink
    stall_after: int | None = None  # pieces sent before the stream stops moving for good
    corrupt: bool = False  # the answer's last byte flipped: other bytes than announced
    refuse: bool = False  # every request answered "not held"


class DhtFaults:
    """Faults scheduled for one peer. Thread-safe: rounds, heartbeats and the event loop consult it at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reads: dict[str, int] = {}  # key → reads of it that still fail
        self._serving: dict[Stream, _Serving] = {}
        self._withhold_shards = False  # computes no shard aggregate: an owner dead or frozen after the agreement
        self.fired: list[str] = []  # what was injected, in order ("read <key>", "stall frame", ...)

    # -- scheduling (tests) ---------------------------------------------------------------------------------
    def fail_reads(self, key: str, times: int = 1) -> "DhtFaults":
        """The next ``times`` reads of ``key`` fail, as a lookup that timed out would."""
        with self._lock:
            self._reads[key] = self._reads.get(key, 0) + times
        return self

    def pace(self, stream: Stream, seconds_per_piece: float) -> "DhtFaults":
        """Serving on ``stream`` pauses ``seconds_per_piece`` before each piece (``dht_frames.PIECE`` bytes)."""
        with self._lock:
            self._serving.setdefault(stream, _Serving()).pace_s = seconds_per_piece
        return self

    def stall(self, stream: Stream, after_pieces: int = 1) -> "DhtFaults":
        """Serving on ``stream`` stops moving after ``after_pieces`` pieces, until the peer closes."""
        with self._lock:
            self._serving.setdefault(stream, _Serving()).stall_after = after_pieces
        return self

    def corrupt(self, stream: Stream) -> "DhtFaults":
        """Every answer on ``stream`` has its last byte flipped (same length, other bytes than announced)."""
        with self._lock:
            self._serving.setdefault(stream, _Serving()).corrupt = True
        return self

    def refuse(self, stream: Stream) -> "DhtFaults":
        """Every request on ``stream`` is answered "not held" (e.g. a donor whose snapshot is gone)."""
        with self._lock:
            self._serving.setdefault(stream, _Serving()).refuse = True
        return self

    def withhold_shards(self) -> "DhtFaults":
        """In sharded rounds this peer computes and publishes no shard aggregate (as an owner that died or froze once
        the round was agreed); it still serves its slices and reads the others' aggregates."""
        with self._lock:
            self._withhold_shards = True
        return self

    # -- consulted by the DHT code --------------------------------------------------------------------------
    def _fire(self, what: str) -> None:
        self.fired.append(what)
        log.info("injected fault: %s", what)

    def read_fails(self, key: str) -> bool:
        """Whether this read of ``key`` fails (consumes one scheduled failure)."""
        with self._lock:
            left = self._reads.get(key, 0)
            if left <= 0:
                return False
            self._reads[key] = left - 1
            self._fire(f"read {key}")
        return True

    def withholds_shards(self) -> bool:
        with self._lock:
            if not self._withhold_shards:
                return False
            if "withhold shards" not in self.fired:
                self._fire("withhold shards")
        return True

    def refuses(self, stream: Stream) -> bool:
        with self._lock:
            serving = self._serving.get(stream)
            if serving is None or not serving.refuse:
                return False
            self._fire(f"refuse {stream.value}")
        return True

    def served(self, stream: Stream, data: bytes) -> bytes:
        """The bytes this peer actually sends for an answer of ``data``."""
        with self._lock:
            serving = self._serving.get(stream)
            if serving is None or not serving.corrupt or not data:
                return data
            self._fire(f"corrupt {stream.value}")
        return data[:-1] + bytes([data[-1] ^ 0xFF])

    async def before_piece(self, stream: Stream, index: int) -> None:
        """Awaited before sending piece ``index`` of an answer: a pause, or a stall that lasts until the serving
        task is cancelled (the peer closing)."""
        with self._lock:
            serving = self._serving.get(stream)
            pace = 0.0 if serving is None else serving.pace_s
            stalled = serving is not None and serving.stall_after is not None and index >= serving.stall_after
            if stalled:
                self._fire(f"stall {stream.value}")
        if stalled:
            await asyncio.get_running_loop().create_future()  # never done: only cancellation ends it
        if pace > 0:
            await asyncio.sleep(pace)
