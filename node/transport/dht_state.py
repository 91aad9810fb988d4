"""Global state for serverless joiners: peers serve snapshots of their reference state, a joiner pulls it in
chunks from several of them at once.

Keys (msgpack values, expiring; signed member records, ``dht_trust``):

- ``{run}/want``  by joiner: target   a joiner is looking for state: ``-1`` (any) or the committed-round count it
  is downloading. Refreshed while the joiner waits; withdrawn (``None``) when it is done, and it lapses by itself if
  the joiner dies.
- ``{run}/state`` by donor: (peer_id, committed, size, sha256, fingerprint)   "I serve this snapshot".

A joiner takes an offer only when more than half of the other live members vouch for its round and fingerprint
(``dht_quorum.offer_support``: they offer the same snapshot, or announced that round from that reference), and
only within the run's rounds: one member cannot hand a joiner a state the run never had.

Donors snapshot only on demand: after applying a round a peer checks ``{run}/want`` (one DHT read) and, if
anyone wants state, serialises its reference (θ_ref + outer state, identical bytes on every replica of a
replica-consistent recipe) and announces it. It keeps the newest snapshot and every one a live joiner is
still downloading, so a long download survives later rounds.

The joiner groups the announcements by (committed, size, sha256, fingerprint), takes the newest version
offered by the most donors, and spreads fixed-size chunks over those donors through a shared work queue
(a fast donor takes more chunks; a chunk that fails goes back to the queue and a donor that fails twice is
dropped). Chunks already held survive a failed attempt, so a retry — against the same version, possibly from
other donors — fetches only what is missing. The assembled blob must match the announced size and sha256;
the daemon then checks the model fingerprint after loading it.

Stream ``lowband.{run}.state``: request = msgpack [committed, offset, length]; answer = status byte +
length-prefixed bytes. Requests are validated (types, ``length ≤ MAX_CHUNK``, range inside the snapshot:
``answer_chunk``).

The joiner's waits (for offers, for more donors, the overall timeout) are decided on the transport's clock
(``node.clock``). The want record's refresh is not: it keeps a record alive whose expiry is DHT (wall) time, and on a
virtual clock it would spin, storing as fast as the DHT answers.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import msgpack
from hivemind.utils import get_dht_time

from node.transport.dht_agreement import Announcement
from node.transport.dht_faults import Stream
from node.transport.dht_frames import receive_moving, request_moving, send_moving
from node.transport.dht_quorum import OfferKey, offer_support

if TYPE_CHECKING:
    from node.transport.dht import DhtTransport

log = logging.getLogger(__name__)
_OK, _MISSING, _BAD = b"\x00", b"\x01", b"\x02"
MAX_CHUNK = 16 << 20  # a request for more is refused: a peer cannot make us buffer an arbitrary range
DEFAULT_CHUNK = 4 << 20
GATHER_S = 5.0  # the most a joiner waits for more donors of the newest state (a donor offers at its round boundary)


Offer = OfferKey  # (committed, size, sha256, fingerprint): what every donor of one snapshot announces
MAX_STATE = 1 << 40  # the largest snapshot an offer may name (a joiner allocates chunk slots from it)


@dataclass
class Download:
    """What a joiner got: the blob, its announcement, and how many bytes each donor served."""

    offer: Offer
    blob: bytes
    per_donor: dict[str, int]
    seconds: float  # from asking to holding the verified blob
    transfer_s: float  # the chunk transfers alone (without waiting for donors to offer)


@dataclass
class _Partial:
    offer: Offer
    chunk: int
    parts: list[bytes | None] = field(default_factory=list)

    def missing(self) -> list[int]:
        return [i for i, p in enumerate(self.parts) if p is None]


def _parse_offer(value: Any, max_round: int) -> tuple[str, Offer] | str:
    """(peer_id, offer), or why the record is not one."""
    if not isinstance(value, (list, tuple)) or len(value) != 5:
        return "malformed offer"
    peer_id, committed, size, sha, fingerprint = value
    if not (isinstance(peer_id, str) and len(peer_id) <= 128 and isinstance(committed, int)
            and isinstance(size, int) and isinstance(sha, str) and len(sha) == 64 and isinstance(fingerprint, str)
            and len(fingerprint) <= 64):
        return "malformed offer"
    if not (0 <= committed <= max_round and 0 < size <= MAX_STATE):
        return "round or size out of range"
    return peer_id, Offer(committed, size, sha, fingerprint)


def answer_chunk(snapshots: Mapping[int, bytes], request: Any) -> tuple[bytes, bytes]:
    """(status, data) for a chunk request [committed, offset, length] against ``snapshots`` (committed → blob): the
    bytes, or a precise refusal. A peer cannot make us buffer more than ``MAX_CHUNK`` or read past a snapshot."""
    if not (isinstance(request, list) and len(request) == 3 and all(isinstance(x, int) for x in request)):
        return _BAD, b"request must be [committed, offset, length] integers"
    committed, offset, length = request
    if not 0 < length <= MAX_CHUNK or offset < 0:
        return _BAD, f"bad range offset={offset} length={length} (length must be in (0, {MAX_CHUNK}])".encode()
    blob = snapshots.get(committed)
    if blob is None:
        return _MISSING, f"no snapshot after {committed} rounds here".encode()
    if offset + length > len(blob):
        return _BAD, f"range {offset}+{length} is past the snapshot's {len(blob)} bytes".encode()
    return _OK, blob[offset:offset + length]


class StateShare:
    """Both sides of state transfer for one ``DhtTransport`` (which owns the DHT, the P2P replica and the loop)."""

    def __init__(self, transport: "DhtTransport", chunk_bytes: int = DEFAULT_CHUNK) -> None:
        if not 0 < chunk_bytes <= MAX_CHUNK:
            raise ValueError(f"state chunk size must be in (0, {MAX_CHUNK}], got {chunk_bytes}")
        self.t = transport
        self.chunk_bytes = chunk_bytes
        self.handler_name = f"lowband.{transport.run_id}.state"
        self.want_key = f"{transport.run_id}/want"
        self.offer_key = f"{transport.run_id}/state"
        self._snapshots: dict[int, bytes] = {}  # committed → blob
        self._served: dict[str, int] = {}  # joiner peer id → bytes streamed to it
        self._lock = threading.Lock()
        self._partial: _Partial | None = None
        self._want_target = -1
        self.expected: dict[int, set[str]] = {}  # round → joiners we gave the state of that round to
        self._provider: tuple[int, str, Callable[[], bytes]] | None = None  # the latest offer's state, made lazily

    @property
    def ttl(self) -> float:
        return max(30.0, 10 * self.t.heartbeat_s)

    # -- donor side ---------------------------------------------------------------------------------------
    def wanted(self, records: dict[str, Any] | None = None) -> dict[str, int]:
        """joiner → target of every live want record (one DHT read, unless the caller read ``want_key`` already)."""
        records = self.t._read(self.want_key) if records is None else records
        return {name: v for name, v in records.items() if isinstance(v, int) and not isinstance(v, bool)
                and -1 <= v <= self.t.max_round and name != self.t.name}

    def offer(self, committed: int, fingerprint: str, make_blob: Callable[[], bytes],
              wants: dict[str, int] | None = None) -> bool:
        """Serve the state after ``committed`` rounds if a joiner wants state; returns whether a snapshot was made.
        ``make_blob`` is called only then: serialising a large model every round would be waste. It is kept for
        ``offer_late`` (``wants``: a read of them already made)."""
        self._provider = (committed, fingerprint, make_blob)
        wants = self.wanted() if wants is None else wants
        if not wants:
            return False
        targets = {v for v in wants.values() if v >= 0}
        with self._lock:
            if committed not in self._snapshots:
                self._snapshots[committed] = make_blob()
            for old in [c for c in self._snapshots if c != committed and c not in targets]:
                del self._snapshots[old]
            blob = self._snapshots[committed]
        # the joiners will contribute from this round: wait for them like for any live member
        self.expected.setdefault(committed, set()).update(n for n, v in wants.items() if v in (-1, committed))
        value = [self.t.peer_id, committed, len(blob), hashlib.sha256(blob).hexdigest(), fingerprint]
        self.t._store(self.offer_key, value, get_dht_time() + self.ttl)
        log.info("[node=%s] offering the state after %d rounds (%d bytes) to %s", self.t.name, committed, len(blob),
                 ", ".join(sorted(wants)))
        return True

    def offer_late(self, round_: int, wants: dict[str, int]) -> None:
        """While round ``round_`` runs (our reference is still the state after ``round_`` rounds): offer it to
        joiners whose want reached us after our boundary. Else they would gather donors until ``GATHER_S`` ran
        out, and this round, which their donors wait for them in, with it."""
        if self._provider is None or self._provider[0] != round_:
            return
        new = {n for n, v in wants.items() if v in (-1, round_)} - self.expected.get(round_, set())
        if new:
            self.offer(*self._provider, wants=wants)

    async def serve(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        timeout = self.t.fetch_timeout_s
        try:
            request = msgpack.unpackb(await receive_moving(reader, timeout, 1 << 10), max_bin_len=0,
                                      max_str_len=0, max_array_len=3, max_map_len=0)
            status, data = self._answer(request)
            if status == _OK:
                with self._lock:
                    peer = str(getattr(info, "peer_id", "?"))
                    self._served[peer] = self._served.get(peer, 0) + len(data)
            writer.write(status)
            await send_moving(self.t.faults.served(Stream.STATE, data) if status == _OK else data, writer, timeout,
                              lambda i: self.t.faults.before_piece(Stream.STATE, i))
            await asyncio.wait_for(reader.read(1), timeout)  # hold the stream until the joiner read it (see dht.py)
        except Exception as exc:
            log.debug("[node=%s] serving state failed: %r", self.t.name, exc)
        finally:
            writer.close()

    def _answer(self, request: Any) -> tuple[bytes, bytes]:
        if self.t.faults.refuses(Stream.STATE):
            return _MISSING, b"refused (injected fault)"
        with self._lock:
            snapshots = dict(self._snapshots)  # a copy: the answer is sliced outside the lock
        return answer_chunk(snapshots, request)

    # -- joiner side --------------------------------------------------------------------------------------
    def offers(self, min_committed: int) -> tuple[dict[Offer, dict[str, str]], set[str], dict[Offer, str]]:
        """(offer → {donor: peer_id} for every supported offer of at least ``min_committed`` rounds, the other live
        members, offer → why it is not taken (yet) for the rest)."""
        records, peers = self.t._read_many([self.offer_key, self.t.peers_key])
        live = self.t.live_peers(records=peers or {}) - {self.t.name}
        mine: dict[str, Offer] = {}
        found: dict[Offer, dict[str, str]] = {}
        for donor, value in (records or {}).items():
            parsed = _parse_offer(value, self.t.max_round)
            if isinstance(parsed, str):
                self.t.trust.rejections.add("state", parsed, (donor, repr(value)[:200]))
                continue
            peer_id, offer = parsed
            mine[donor] = offer
            if offer.committed >= min_committed and donor != self.t.name:
                found.setdefault(offer, {})[donor] = peer_id
        unsupported: dict[Offer, str] = {}
        announced: dict[int, dict[str, Announcement]] = {}
        for offer in list(found):
            if offer.committed not in announced:
                seen = self.t._read(f"{self.t.run_id}/round/{offer.committed}")
                parsed_seen = {m: Announcement.parse(v) for m, v in seen.items()}
                announced[offer.committed] = {m: a for m, a in parsed_seen.items() if a is not None}
            ok, why = offer_support(offer, mine, announced[offer.committed], len(live))
            if not ok:
                unsupported[offer] = why
                del found[offer]
        return found, live, unsupported

    def _want(self, stop: threading.Event) -> None:
        while True:
            self.t._store(self.want_key, self._want_target, get_dht_time() + 3 * self.t.heartbeat_s)
            if stop.wait(self.t.heartbeat_s):  # real time: it refreshes a record that expires in DHT time
                return

    def fetch(self, min_committed: int, timeout_s: float, gather_s: float | None = None,
              cancelled: threading.Event | None = None) -> Download | None:
        """The newest state of at least ``min_committed`` rounds, or None when none arrived within ``timeout_s``.
        Announces the want record for as long as it runs."""
        clock = self.t.clock
        started = clock.now()
        deadline = started + timeout_s
        # donors snapshot at their next round boundary, so one that is mid-round offers later (and a newer version):
        # wait a while for every live peer's offer of the newest version, to spread the download over all of them
        gather = max(2 * self.t.heartbeat_s, GATHER_S) if gather_s is None else gather_s
        self._want_target = -1
        stop = threading.Event()
        refresher = threading.Thread(target=self._want, args=(stop,), name=f"want-{self.t.name}", daemon=True)
        refresher.start()
        per_donor: dict[str, int] = {}
        transfer_s = 0.0
        try:
            first_seen: float | None = None
            while clock.now() < deadline and not (cancelled is not None and cancelled.is_set()):
                offers, live, unsupported = self.offers(min_committed)
                if not offers:
                    first_seen = None
                    clock.sleep(self.t.poll_s * 4, cancelled)  # polling the DHT for offers, bounded by the deadline
                    continue
                first_seen = clock.now() if first_seen is None else first_seen  # (0.0 is a time)
                offer, donors = max(offers.items(), key=lambda kv: (kv[0].committed, len(kv[1]), kv[0].sha256))
                if not live <= set(donors) and clock.now() < first_seen + gather:
                    clock.sleep(self.t.poll_s, cancelled)  # more donors of this version may still be announcing
                    continue
                for other, why in unsupported.items():  # passed over for a supported one: count it
                    if other.committed >= offer.committed:
                        self.t.trust.rejections.add("state", "offer not vouched for by the members", other)
                self._want_target = offer.committed  # donors keep this snapshot while we download it
                if self._partial is None or self._partial.offer != offer:
                    n = -(-offer.size // self.chunk_bytes)
                    self._partial = _Partial(offer, self.chunk_bytes, [None] * n)
                budget = max(0.1, deadline - clock.now())
                t0 = clock.now()
                got = self.t._run(self._download(self._partial, donors), timeout=budget + self.t.rpc_timeout_s)
                transfer_s += clock.now() - t0
                for donor, n in got.items():
                    per_donor[donor] = per_donor.get(donor, 0) + n
                if not self._partial.missing():
                    blob = b"".join(p for p in self._partial.parts if p is not None)
                    self._partial = None
                    if len(blob) == offer.size and hashlib.sha256(blob).hexdigest() == offer.sha256:
                        return Download(offer, blob, per_donor, clock.now() - started, transfer_s)
                    log.warning("[node=%s] assembled state does not match its announcement: fetching again",
                                self.t.name)
                else:
                    log.info("[node=%s] state download incomplete (%d chunks missing): retrying", self.t.name,
                             len(self._partial.missing()))
            return None
        finally:
            stop.set()
            refresher.join(timeout=self.t.rpc_timeout_s + self.t.heartbeat_s)
            # withdraw the want at once (a record cannot be deleted: outlive the last refresh with a non-int), so
            # the donors stop snapshotting for us
            self.t._store(self.want_key, None, get_dht_time() + 3 * self.t.heartbeat_s + 1.0)

    async def _chunk(self, peer_id: str, committed: int, offset: int, length: int) -> bytes:
        """One chunk; every step must move within ``fetch_timeout_s`` (a chunk may take longer on a slow link)."""
        status, data = await request_moving(self.t.p2p, peer_id, self.handler_name,
                                            msgpack.packb([committed, offset, length]), self.t.fetch_timeout_s,
                                            max(length, 1 << 10))  # an error text may be sent instead
        if status != _OK:
            raise LookupError(data[:200].decode(errors="replace"))
        if len(data) != length:
            raise ValueError(f"chunk of {len(data)} bytes, asked for {length}")
        return data

    async def _download(self, partial: _Partial, donors: dict[str, str]) -> dict[str, int]:
        """Fill ``partial``'s missing chunks from ``donors`` in parallel; returns bytes per donor."""
        queue = deque(partial.missing())
        got: dict[str, int] = {d: 0 for d in donors}
        size, chunk, committed = partial.offer.size, partial.chunk, partial.offer.committed

        async def drain(donor: str, peer_id: str) -> None:
            failures = 0
            while queue:
                i = queue.popleft()
                length = min(chunk, size - i * chunk)
                try:
                    data = await self._chunk(peer_id, committed, i * chunk, length)
                except Exception as exc:
                    queue.append(i)  # another donor (or a later attempt) takes it
                    failures += 1
                    log.info("[node=%s] chunk %d from %s failed (%r)", self.t.name, i, donor, exc)
                    if failures >= 2:
                        return
                    await asyncio.sleep(0.05)
                    continue
                partial.parts[i] = data
                got[donor] += len(data)

        await asyncio.gather(*(drain(d, p) for d, p in sorted(donors.items())))
        return got

    def served_bytes(self) -> int:
        with self._lock:
            return sum(self._served.values())
