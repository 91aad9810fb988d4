"""A large serverless round reduced by shard over the network: serving slices, computing and publishing shard
aggregates, falling back when an owner is dead or slow, and assembling the round's aggregate.

Used by ``DhtTransport`` once a round's outcome is decided (``dht_agreement``) with more than ``shard_above``
members; the rules and the codec work are ``dht_shards``'s. Below that, or without a model to cut (a peer that has
not submitted a frame yet), the round is the all-gather (``dht_gather``).

Agreement. A peer that closes a group larger than ``shard_above`` does not fetch the frames before it agrees: its
have-list lists the announced frames (signed announcements, ``dht_trust``), so the agreed set is the senders every
listing member saw announced. The reduce then runs on exactly the decided outcome's senders, on every peer.

Records and streams (docs/wire.md):

- ``{run}/round/{r}/shard`` by publisher (signed, a member's): ``[[shard, members, size, sha256, set digest], ...]``
  — the shard aggregates it computed for the agreed set of that digest (``dht_shards.ShardEntry``; ``members`` is the
  agreed member count, which fixes the plan).
- stream ``lowband.{run}.slice``: request = round (8 bytes) + frame sha256 (32 raw) + members (4) + shard (4), all
  big-endian; answer = status byte (0 found, 1 not held, 2 bad request) + the slice as length-prefixed raw data. A
  member serves slices of its own frames only (a slice is signed by its sender).
- the shard aggregates themselves are served by the frame stream (``dht_frames``) by (round, sha256), as frames are.

Waits. A member computes the shards it owns at once; for a shard at rank ``j`` of its fallback order it computes it
itself when it has no verified aggregate of it ``j × owner_wait_s`` after the round was decided — so a dead or slow
owner costs one ``owner_wait_s`` per dead owner in the chain, not the round. Every honest computer of a shard gets
the same bytes (the reduce is deterministic over the same signed slices), so which copy a peer takes does not matter.

Trust, stated plainly: a slice is signed by its sender; a shard aggregate is bound by its computer's signed shard
record, which names its sha256, the round (the record's key), the shard, the member count and the agreed set's
digest. Honest computers of a shard make byte-identical aggregates, so two records naming different bytes for one
shard are a provable disagreement (counted as a rejection; the lower-ranked copy is taken). A member that serves a
well-formed but *wrong* aggregate (a lie about a partial sum) is therefore detected only when another computer of
the same shard publishes too: there is no verification by recomputation unless an owner is slow. A sender that signs two different slices for one shard can split the owners' views
in the same way. Both are stated in docs/serverless.md.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING, Any, Sequence

from hivemind.utils import get_dht_time

from node import wire
from node.errors import PayloadError
from node.transport.dht_agreement import Announcement, Outcome
from node.transport.dht_faults import Stream
from node.transport.dht_frames import KEEP_FETCHED_ROUNDS, digest, receive_moving, request_moving, send_moving
from node.transport.dht_shards import (MAX_SHARDS, ShardCodec, ShardEntry, ShardPlan, fallback_order,
                                       members_digest, parse_entries)
from node.transport.messages import RoundResult, RoundStatus

if TYPE_CHECKING:
    from node.transport.dht import DhtTransport

log = logging.getLogger(__name__)
_OK, _MISSING, _BAD = b"\x00", b"\x01", b"\x02"
REQUEST_BYTES = 48
SHARD_POLL_S = 0.2  # how often a peer reads the shard records while it lacks shards
CACHE_FRAMES = 4  # slices held for serving: at most this many of our frames' worth of bytes


class ShardedReduce:
    """One peer's side of the sharded reduce. ``shard_above``: rounds with more agreed members are reduced by shard
    (None: never); ``dense_aggregate``: what a dense run's shard aggregates are encoded with (the run file's
    ``rounds.aggregate_codec``); ``owner_wait_s``: how long before the next member computes a shard nobody served."""

    def __init__(self, transport: "DhtTransport", shard_above: int | None, dense_aggregate: str = "identity",
                 owner_wait_s: float = 5.0) -> None:
        self.t = transport
        self.shard_above, self.dense_aggregate, self.owner_wait_s = shard_above, dense_aggregate, owner_wait_s
        self.handler_name = f"lowband.{transport.run_id}.slice"
        self.codec: ShardCodec | None = None
        self._lock = threading.Lock()
        self._own: dict[tuple[int, str], wire.Envelope] = {}  # (round, frame sha256) → our frame, unpacked
        self._slices: dict[tuple[int, str, int, int], bytes] = {}  # (round, sha, members, shard) → our slice
        self.computed: dict[int, list[int]] = {}  # round → shards this peer computed (tests, logs)

    # -- when ---------------------------------------------------------------------------------------------
    def applies(self, members: int) -> bool:
        """Whether a round of ``members`` agreed members is reduced by shard: the same answer on every peer of the run
        (``shard_above`` is the run's; a peer that cannot cut the model then fetches the state, ``adopt``)."""
        return self.shard_above is not None and members > self.shard_above

    def note_own(self, round_: int, frame: bytes) -> None:
        """Our frame for ``round_``: learn the model from it (once), keep it unpacked for slicing."""
        if self.shard_above is None:
            return
        try:
            if self.codec is None:
                self.codec = ShardCodec.from_frame(frame, self.dense_aggregate)
            own = self.codec.open_own(frame, round_, self.t.name)
        except (PayloadError, ValueError) as exc:
            log.error("[node=%s round=%d] our own frame could not be cut into slices (%s): a round reduced by shard will "
                      "not find our slices", self.t.name, round_, exc)
            return
        with self._lock:
            self._own[(round_, digest(frame))] = own
            for key in [k for k in self._own if k[0] <= round_ - KEEP_FETCHED_ROUNDS]:
                self._own.pop(key)
            for key in [k for k in self._slices if k[0] <= round_ - KEEP_FETCHED_ROUNDS]:
                self._slices.pop(key)

    # -- serving slices -----------------------------------------------------------------------------------
    def _slice(self, round_: int, sha: str, members: int, shard: int) -> bytes | None:
        codec = self.codec
        with self._lock:
            own = self._own.get((round_, sha))
            made = self._slices.get((round_, sha, members, shard))
        if own is None or codec is None:
            return None
        if made is None:
            plan = codec.plan(members)
            if shard >= plan.count:
                return None
            made = codec.slice(own, plan, shard, self.t.trust.key)
            with self._lock:  # bounded: a peer asking for many plans gets slices made again, not held
                if sum(len(v) for v in self._slices.values()) + len(made) <= CACHE_FRAMES * own.nbytes:
                    self._slices[(round_, sha, members, shard)] = made
        return made

    async def serve(self, _info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = self.t.frames
        try:
            request = await receive_moving(reader, frames.fetch_timeout_s, REQUEST_BYTES)
            data, status = b"", _BAD
            if len(request) == REQUEST_BYTES:
                round_, sha = int.from_bytes(request[:8], "big"), request[8:40].hex()
                members, shard = int.from_bytes(request[40:44], "big"), int.from_bytes(request[44:48], "big")
                if 1 <= members <= MAX_SHARDS and shard < members:
                    got = None if self.t.faults.refuses(Stream.SLICE) else self._slice(round_, sha, members, shard)
                    data, status = (got, _OK) if got is not None else (b"", _MISSING)
                    if got is not None:  # a round we hold a frame of (a request names any round: no entry for it)
                        frames.served[round_] = frames.served.get(round_, 0) + len(data)
            writer.write(status)
            await send_moving(self.t.faults.served(Stream.SLICE, data), writer, frames.fetch_timeout_s,
                              lambda i: self.t.faults.before_piece(Stream.SLICE, i))
            await asyncio.wait_for(reader.read(1), frames.fetch_timeout_s)  # as dht_frames: let the caller close
        except Exception as exc:
            log.debug("[node=%s] serving a slice failed: %r", self.t.name, exc)
        finally:
            writer.close()

    # -- computing a shard --------------------------------------------------------------------------------
    async def _fetch_slice(self, round_: int, sender: str, peer_id: str, sha: str, plan: ShardPlan, members: int,
                           shard: int) -> wire.Envelope | str:
        codec = self.codec
        assert codec is not None
        request = (round_.to_bytes(8, "big") + bytes.fromhex(sha) + members.to_bytes(4, "big")
                   + shard.to_bytes(4, "big"))
        try:
            status, data = await asyncio.wait_for(
                request_moving(self.t.p2p, peer_id, self.handler_name, request, self.t.fetch_timeout_s,
                               codec.max_slice(plan, shard)), self.t.fetch_timeout_s * 4)
        except Exception as exc:
            return f"no slice: {exc!r}"
        if status != _OK:
            return "the sender does not serve that slice"
        public = self.t.trust.writers.get(sender)
        if public is None:  # its announcement was read, so its key is known; if not, nothing it sends is trusted
            return "no key known for the sender: its slice cannot be verified"
        try:
            return codec.open_slice(data, round_, sender, plan, shard, public)
        except PayloadError as exc:
            self.t.trust.rejections.add("slice", "invalid slice", (round_, sender, shard))
            return f"invalid slice: {exc}"

    def _compute(self, round_: int, shard: int, plan: ShardPlan, pairs: dict[str, str],
                 announced: dict[str, Announcement], timeout: float) -> tuple[bytes | str, int]:
        """The aggregate of ``shard``, from every agreed member's slice (``pairs``: sender → frame sha256), or why
        it could not be computed; and the bytes of the slices received."""
        codec = self.codec
        assert codec is not None
        members = len(pairs)

        async def gather() -> list[wire.Envelope | str]:
            jobs = []
            for sender, sha in sorted(pairs.items()):
                if sender == self.t.name:
                    jobs.append(asyncio.sleep(0, self._own_slice(round_, sha, plan, members, shard)))
                elif sender in announced:
                    jobs.append(self._fetch_slice(round_, sender, announced[sender].peer_id, sha, plan, members,
                                                  shard))
                else:
                    jobs.append(asyncio.sleep(0, f"no announcement of {sender} read"))
            return await asyncio.gather(*jobs)

        try:
            got = self.t._run(gather(), timeout=timeout)
        except Exception as exc:
            return f"slices not fetched: {exc!r}", 0
        received = sum(g.nbytes for s, g in zip(sorted(pairs), got) if isinstance(g, wire.Envelope) and s != self.t.name)
        bad = [f"{s}: {g}" for s, g in zip(sorted(pairs), got) if isinstance(g, str)]
        if bad:
            return "; ".join(bad), received
        slices = [g for g in got if isinstance(g, wire.Envelope)]
        return codec.reduce(slices, plan, shard), received

    def _own_slice(self, round_: int, sha: str, plan: ShardPlan, members: int, shard: int) -> wire.Envelope | str:
        data = self._slice(round_, sha, members, shard)
        if data is None or self.codec is None:
            return "our own frame of the agreed set is not held"
        return self.codec.open_slice(data, round_, self.t.name, plan, shard, None)

    # -- the round ----------------------------------------------------------------------------------------
    def adopt(self, round_: int, outcome: Outcome, announced: dict[str, Announcement], mine: str, deadline: float,
              received: int) -> RoundResult:
        """The decided ``outcome`` reduced by shard: compute what this peer owns (or must take over), fetch every
        other shard's aggregate, assemble. Every peer that commits applies the same aggregate. ``mine``: our
        reference fingerprint (the outcome is published again under our name, as ``_adopt`` does, so the members
        settling on it stop waiting for us)."""
        t, codec = self.t, self.codec
        if outcome.publisher != t.name:
            t._publish_done(round_, mine, True, outcome.pairs, outcome.confirmed, outcome.published_at, wait=False)

        def sent() -> int:  # read when the result is made: serving goes on during the round
            return t.frames.served.get(round_, 0)

        if codec is None:
            return RoundResult(round_, RoundStatus.RESULT_GONE, reason="the round was reduced by shard and this "
                               "peer does not know the model yet: fetching the state", bytes_sent=sent())
        pairs = dict(outcome.pairs)
        members = sorted(pairs)
        plan, set_digest = codec.plan(len(members)), members_digest(outcome.pairs)
        orders = [fallback_order(s, members) for s in range(plan.count)]
        member = t.name in pairs
        peer_ids = {**{n: a.peer_id for n, a in announced.items()}, **outcome.sources, t.name: t.peer_id}
        start = t.clock.now()
        parts: dict[int, wire.Envelope] = {}
        failed: set[tuple[str, str]] = set()  # (publisher, sha256) of aggregates that did not verify
        mine: list[ShardEntry] = []
        tried: dict[int, float] = {}  # shard → when we last failed to compute it (tried again after owner_wait_s)
        key = f"{t.run_id}/round/{round_}/shard"
        while True:
            for s in range(plan.count):  # ours, and the ones whose earlier computers served nothing in time
                rank = orders[s].index(t.name) if member else -1
                if s in parts or rank < 0 or s in {e.shard for e in mine}:
                    continue
                if t.clock.now() - start < rank * self.owner_wait_s or t.faults.withholds_shards():
                    continue
                if s in tried and t.clock.now() < tried[s] + self.owner_wait_s:
                    continue
                made, got = self._compute(round_, s, plan, pairs, announced, max(0.1, deadline - t.clock.now()))
                received += got
                if isinstance(made, str):
                    tried[s] = t.clock.now()
                    log.warning("[node=%s round=%d] could not compute shard %d: %s", t.name, round_, s, made)
                    # read the published records before the next attempt: an attempt may have waited a whole fetch
                    # timeout on one stalled sender, and every other shard's aggregate may be published meanwhile
                    break
                sha = t.frames.add(round_, made)
                parts[s] = codec.open_aggregate(made, round_, plan, s)  # ours: the same bytes as any honest copy
                mine.append(ShardEntry(s, len(members), len(made), sha, set_digest))
                self.computed.setdefault(round_, []).append(s)
                for old in [r for r in self.computed if r <= round_ - KEEP_FETCHED_ROUNDS]:
                    self.computed.pop(old)
                t._store(key, [e.encode() for e in mine], get_dht_time() + t._record_ttl)
                if rank > 0:
                    log.info("[node=%s round=%d] computed shard %d in place of %s", t.name, round_, s,
                             ", ".join(orders[s][:rank]))
            log.debug("[node=%s round=%d] shards held %d of %d after %.2f s", t.name, round_, len(parts), plan.count,
                      t.clock.now() - start)
            received += self._take_published(round_, t._read(key), plan, orders, set_digest, parts, failed, peer_ids,
                                              deadline, t.clock.now() - start)
            if len(parts) == plan.count:
                break
            if t.clock.now() >= deadline or self._waited():
                missing = sorted(set(range(plan.count)) - set(parts))
                return RoundResult(round_, RoundStatus.FRAMES_UNAVAILABLE, reason=f"no verified aggregate of shard(s) "
                                   f"{missing} of {plan.count} within the round: fetching the state instead",
                                   bytes_sent=sent(), bytes_received=received)
        frame = codec.assemble([parts[s] for s in range(plan.count)], round_)
        return RoundResult(round_, RoundStatus.COMMITTED, reason=f"{len(members)} members reduced in {plan.count} "
                           "shards", bytes_sent=sent(), bytes_received=received, aggregate=frame,
                           aggregate_codec=codec.aggregate.name, aggregate_members=tuple(members))

    def _waited(self) -> bool:
        """Wait one shard poll; True when waiting longer is pointless (as ``DhtTransport._given_up``). Slower than
        the agreement's poll: every member reads the shard record until it holds every shard, and with tens of
        members those reads were most of a round's CPU."""
        t = self.t
        return t.clock.sleep(max(t.poll_s, SHARD_POLL_S), t._stop) or t.cancel.is_set() or not t.dht.is_alive()

    def _take_published(self, round_: int, records: dict[str, Any], plan: ShardPlan, orders: Sequence[list[str]],
                        set_digest: str, parts: dict[int, wire.Envelope], failed: set[tuple[str, str]],
                        peer_ids: dict[str, str], deadline: float, elapsed: float) -> int:
        """Fetch and verify the published aggregates of the shards not held yet, each from its lowest-ranked
        computer that has one; bytes received. ``elapsed``: seconds since this peer's round was decided — a computer
        at rank ``j`` of a shard's fallback order is taken only once ``j × owner_wait_s`` passed, as it may compute
        only then: a member further down the order that publishes at once (a forged but well-formed aggregate) is
        not taken before the owner and the members ranked before it had their time."""
        t, codec = self.t, self.codec
        assert codec is not None
        by_shard: dict[int, dict[str, ShardEntry]] = {}
        for publisher, value in records.items():
            entries = parse_entries(value)
            if entries is None:
                t.trust.rejections.add("shard", "malformed shard record", (round_, publisher))
                continue
            for e in entries:
                if e.members != set_digest or e.count != len(orders[0]) or e.shard >= plan.count:
                    continue  # another agreed set (a peer that decided otherwise) or another plan: not this round's
                if publisher not in orders[e.shard] or e.size > codec.max_aggregate(plan, e.shard):
                    t.trust.rejections.add("shard", "shard entry out of range", (round_, publisher, e.shard))
                    continue
                by_shard.setdefault(e.shard, {})[publisher] = e
        wanted: dict[str, tuple[list[str], int | None, str]] = {}
        chosen: dict[str, tuple[int, str]] = {}
        for s, entries in by_shard.items():
            if s in parts:
                continue
            if len({e.sha256 for e in entries.values()}) > 1:
                t.trust.rejections.add("shard", "conflicting shard aggregates", (round_, s, tuple(sorted(entries))))
            for rank, publisher in enumerate(orders[s]):
                if elapsed < rank * self.owner_wait_s:
                    break  # not its turn yet, nor any later computer's
                e = entries.get(publisher)
                if e is not None and (publisher, e.sha256) not in failed and publisher in peer_ids:
                    # then any member: a peer serves every aggregate it fetched and verified (by sha256, dht_frames)
                    others = [peer_ids[m] for m in orders[s] if m != publisher and m in peer_ids]
                    wanted[f"shard {s}"] = ([peer_ids[publisher], *others], e.size, e.sha256)
                    chosen[f"shard {s}"] = (s, publisher)
                    break
        if not wanted:
            return 0
        fetched, received = t._fetch(round_, wanted, deadline)
        for label, got in fetched.items():
            s, publisher = chosen[label]
            sha = wanted[label][2]
            if not isinstance(got, bytes):
                failed.add((publisher, sha))
                t._drop_warning(round_, f"{label} from {publisher}", got)
                continue
            try:
                parts[s] = codec.open_aggregate(got, round_, plan, s)
            except PayloadError as exc:
                failed.add((publisher, sha))
                t.trust.rejections.add("shard", "invalid shard aggregate", (round_, publisher, s))
                t._drop_warning(round_, f"{label} from {publisher}", f"invalid aggregate: {exc}")
        return received
