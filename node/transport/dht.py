"""Serverless transport: leaderless rounds over hivemind's DHT, frames pulled peer to peer over its libp2p streams.

Keys (values msgpack; every record expires, is stored under its writer's key and signed, ``dht_signing``, and is
read only if a member of the run wrote it, ``dht_trust``; membership records are in ``dht_members``):

- ``{run}/round/{r}``       by sender: (peer_id, size, sha256, reference fingerprint)   "I submitted this frame for
  round r, computed from this reference" (a retry of the round announces its new frame under the same key)
- ``{run}/round/{r}/have``  by member: ([sender, sha256] pairs this peer fetched and verified, the senders it took
  into the round)
- ``{run}/round/{r}/done``  by member: (peer_id, fingerprint, published_at, committed, pairs, confirmed)   the
  outcome this peer applied, and the members whose have-lists gave it

Frames are named by (sender, sha256), never by sender alone (``dht_frames``): a peer that retries a round submits
a new frame while the others may already have committed its first one, and every peer serves every frame it holds.

A round, as every peer runs it in ``collect`` (every rule is a pure function in ``dht_agreement`` or ``dht_quorum``,
where each is explained; this module reads and writes the records, moves the frames and calls them):

1. close (``close_group``, ``close_wait``, then ``same_reference``): wait until every live peer (and every joiner
   this peer just gave the state of this round) announced, or the round's wait after the first announcement (fixed,
   or adaptive as in the coordinator, ``node.membership.round_wait``), bounded by ``timeout_s``; with fewer than
   ``min_members`` announcements the round stays open (as a coordinator keeps it), and a peer that finds the run a
   round ahead meanwhile leaves it to fetch the state. Members whose reference differs from ours are left out; if
   another reference is held by more members, ours is the diverged one (``state_needed``).
2. decided already (``round_outcome``)? A committed outcome from our reference that its members' have-lists
   support *is* the round: adopt it (step 5) — a retry, a late peer or an observer gets the same.
3. fetch and agree (``take_late``, ``agree_step``, ``agreed_set``): pull every member's frame by its sha256 (each
   stream step within ``fetch_timeout_s``), publish ``have``, wait (≤ ``agree_wait_s``) for every member's list over
   the whole group (or a supported outcome, then step 5), taking in senders another member's group holds. The set is
   (what I hold) ∩ (every have-list received), from the senders that listed; it commits with at least
   ``min_members`` frames and lists from more than half of the voters (the group's live members).
4. publish the outcome (or a "not committed" record, so no one waits for us) and settle (``settle_step``, ≤
   ``settle_s``, for every member of the group): the earliest published supported outcome (ties: the publisher's
   name) is the round's; an earlier one still pending for us leaves the round undecided (it is read again).
5. adopt (``adopt_sources``): commit exactly that outcome's frames, from their senders or any publisher of it
   (``dht_gather``) — or, for an outcome of more than ``shard_above`` members, reduce it by shard (``dht_sharded``:
   a member whose group is that large lists the announced frames in step 3 instead of fetching them).

Limits, stated plainly: one member can still send a harmful but well-formed frame (robust aggregation is not
implemented), and can leave an outcome undecided by withholding its lists; it cannot make the others apply an
outcome that a quorum's signed lists do not give, nor write in another's name. Two members that publish different
supported outcomes without seeing each other's within ``settle_s`` keep them; the minority sees it in the next
round's announcements (the reference fingerprints differ) and fetches the state.

Waits are decided on an injected clock (``node.clock``); the heartbeat period is real time (it keeps alive a record
whose expiry is DHT time). Faults for tests come through ``dht_faults.DhtFaults`` (``create(..., faults=...)``).
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Callable, Sequence

import hivemind
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time

from node.clock import SYSTEM_CLOCK, Clock
from node.identity import NodeKey
from node.membership import DeadlinePolicy, round_wait
from node.transport.dht_agreement import (AgreeDecision, Announcement, CloseView, GroupDecision, GroupKind, HaveList,
                                          Outcome, Pair, ReferenceKind, Verdict, agree_step,
                                          agreed_set, close_group, close_wait,
                                          late_senders, parse_haves, round_joiners, same_reference, settle_step,
                                          take_late)
from node.transport.dht_faults import DhtFaults
from node.transport.dht_frames import KEEP_OWN_ROUNDS, FramePool
from node.transport.dht_gather import FrameGather
from node.transport.dht_sharded import ShardedReduce
from node.transport.dht_members import MAX_ROUND
from node.transport.dht_process import start_dht
from node.transport.dht_quorum import round_outcome
from node.transport.dht_signing import SignedRecordValidator
from node.transport.dht_state import DEFAULT_CHUNK, StateShare
from node.transport.dht_trust import RunTrust
from node.transport.messages import RoundResult, RoundStatus, StateBlob

log = logging.getLogger(__name__)


async def _cancel_pending() -> None:
    """Cancel what still runs on the loop (e.g. serving a frame to a slow peer), so it ends while the loop lives."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=1.0)


class DhtTransport(FrameGather):
    """``trust``: this peer's key, name and grant and the run's authority (default: an open run and a fresh key);
    ``validator``: the one its DHT process runs (``create`` makes both); ``max_round``: the run's last round (a
    record naming a later one is out of range)."""

    def __init__(self, run_id: str, name: str, dht: hivemind.DHT, round_wait_s: float = 5.0, *,
                 validator: SignedRecordValidator, trust: RunTrust, first_round: int = 0, heartbeat_s: float = 1.0,
                 rpc_timeout_s: float = 5.0, fetch_timeout_s: float = 10.0, agree_wait_s: float | None = None,
                 poll_s: float = 0.05, owns_dht: bool = False, deadline: DeadlinePolicy | None = None,
                 state_chunk_bytes: int = DEFAULT_CHUNK, cancel: threading.Event | None = None,
                 min_members: int = 1, settle_s: float = 2.0, clock: Clock = SYSTEM_CLOCK,
                 faults: DhtFaults | None = None, max_round: int = MAX_ROUND, shard_above: int | None = None,
                 aggregate_codec: str = "identity", owner_wait_s: float | None = None) -> None:
        self.run_id, self.name, self.dht = run_id, name, dht
        self.trust, self.validator, self.max_round = trust, validator, max_round
        self.clock = clock  # the round's waits and the poll interval
        self.faults = faults or DhtFaults()  # none unless a test schedules some
        self.round_wait_s, self.first_round = round_wait_s, first_round
        self.heartbeat_s, self.rpc_timeout_s, self.poll_s = heartbeat_s, rpc_timeout_s, poll_s
        self.fetch_timeout_s = fetch_timeout_s
        self.agree_wait_s = fetch_timeout_s + round_wait_s if agree_wait_s is None else agree_wait_s
        self.owns_dht = owns_dht
        self.deadline = deadline
        self.min_members = min_members  # a round commits only with at least this many agreed frames
        self.settle_s = settle_s  # how long a member that committed waits to see the others' outcomes
        self.spreads: list[float] = []  # first-to-last announcement times of recent complete rounds
        self.from_round = first_round
        self.joined = False
        self.shard, self.since, self._status = 0, 0, "joining"
        self.handler_name = f"lowband.{run_id}.frame"
        self.frames = FramePool(name, self.handler_name, fetch_timeout_s, self.faults)
        # rounds of more than ``shard_above`` members are reduced by shard (dht_sharded); a dead owner costs owner_wait_s
        self.sharded = ShardedReduce(self, shard_above, aggregate_codec,
                                     fetch_timeout_s if owner_wait_s is None else owner_wait_s)
        self._fingerprints: dict[int, str] = {}  # round → our reference fingerprint when we submitted
        # round → how it closed and what was agreed, for recent rounds (logs, benchmarks, tests read them)
        self.closed: dict[int, GroupDecision] = {}
        self.agreed: dict[int, AgreeDecision] = {}
        self._lock = threading.Lock()  # serialises sends into the DHT's pipe
        self._background: set[Any] = set()  # stores sent without waiting (``_store_later``)
        self._warned: dict[str, float] = {}
        self._kinds: dict[bytes, str] = {}
        self._stop = threading.Event()
        self.cancel = cancel or threading.Event()  # the owner's stop (e.g. SIGTERM): abandon waits for a round
        self._hb: threading.Thread | None = None
        self._hb_expiration = 0.0
        self._closed = False
        # our own event loop: the P2P replica's streams live on it; sync callers submit coroutines with a timeout
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name=f"dht-{name}", daemon=True)
        self._loop_thread.start()
        try:
            maddr = self._dht_future(dht.run_coroutine, hivemind.DHT._get_p2p_daemon_listen_maddr)
            self.p2p: P2P = self._run(P2P.replicate(maddr))
            self.peer_id: str = self.p2p.peer_id.to_base58()
            self._run(self.p2p.add_binary_stream_handler(self.handler_name, self.frames.serve))
            self.state = StateShare(self, state_chunk_bytes)
            self._run(self.p2p.add_binary_stream_handler(self.state.handler_name, self.state.serve))
            self._run(self.p2p.add_binary_stream_handler(self.sharded.handler_name, self.sharded.serve))
        except BaseException:
            self.close(announce_leave=False)
            raise

    @classmethod
    def create(cls, run_id: str, name: str, initial_peers: Sequence[str] = (), *,
               host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",), nat_port_map: bool = False,
               auto_nat: bool = False, use_relay: bool = False, client_mode: bool = False,
               identity_path: str | None = None, announce_maddrs: Sequence[str] = (), start_timeout_s: float = 30.0,
               trust: RunTrust | None = None, **kw: Any) -> "DhtTransport":
        """Start a DHT (and its p2pd) owned by the transport: ``close``/``leave`` shut it down, and both die with this
        process (``dht_process``). NAT traversal is off unless asked for, so nothing but ``host_maddrs`` is touched.
        ``announce_maddrs``: what the others dial instead of the listen addresses (a forwarded port, a relay)."""
        trust = trust or RunTrust(run_id, NodeKey.generate(), name)
        validator = SignedRecordValidator(trust.key, run_id)
        extra: dict[str, Any] = {"identity_path": identity_path} if identity_path else {}
        if announce_maddrs:
            extra["announce_maddrs"] = list(announce_maddrs)
        dht = start_dht(initial_peers=list(initial_peers), host_maddrs=list(host_maddrs), nat_port_map=nat_port_map,
                        auto_nat=auto_nat, use_relay=use_relay, client_mode=client_mode,
                        record_validators=[validator], **extra)
        try:
            dht.wait_until_ready(timeout=start_timeout_s)
        except BaseException:
            dht.shutdown()
            validator.close()
            raise
        return cls(run_id, name, dht, owns_dht=True, trust=trust, validator=validator, **kw)

    def visible_maddrs(self) -> list[str]:
        return [str(m) for m in self._dht_future(self.dht.run_coroutine, hivemind.DHT._get_visible_maddrs)]

    @property
    def rejected(self) -> dict[str, int]:
        """Records ignored so far, "kind: reason" → count (the DHT process's counts as last fetched)."""
        return self.trust.rejections.snapshot()

    # -- a round ------------------------------------------------------------------------------------------
    def submit(self, round_: int, payload: bytes, fingerprint: str = "") -> None:
        """Announce and serve ``payload`` for ``round_``. ``fingerprint``: this replica's reference before the round
        (peers whose reference differs are kept out of each other's rounds; "" = not checked). Submitting again for
        the same round (a retry) announces the new frame; the earlier ones stay served."""
        sha = self.frames.add_own(round_, payload)
        self.sharded.note_own(round_, payload)
        with self._lock:
            self._fingerprints[round_] = fingerprint
            for old in [r for r in self._fingerprints if r <= round_ - KEEP_OWN_ROUNDS]:
                for table in (self._fingerprints, self.closed, self.agreed):
                    table.pop(old, None)
            for old in [r for r in self.state.expected if r < round_]:
                self.state.expected.pop(old, None)
        value = list(Announcement(self.peer_id, len(payload), sha, fingerprint))
        self._store(f"{self.run_id}/round/{round_}", value, get_dht_time() + self._record_ttl)

    @property
    def _record_ttl(self) -> float:
        """How long a round's records live: a few rounds' waits, at most a day (the validator refuses records that
        claim to live longer than ``dht_signing.MAX_TTL_S``)."""
        return min(24 * 3600.0, max(60.0, 4 * (self.round_wait_s + self.agree_wait_s)))

    def _given_up(self) -> bool:
        """Wait one poll interval; True when waiting longer is pointless (closed, cancelled, DHT process gone)."""
        return self.clock.sleep(self.poll_s, self._stop) or self.cancel.is_set() or not self.dht.is_alive()

    def round_wait(self) -> tuple[float, str]:
        if self.deadline is None:
            return self.round_wait_s, f"fixed {self.round_wait_s:.1f} s"
        return round_wait(self.spreads, self.deadline)

    def _close_group(self, round_: int, deadline: float
                     ) -> tuple[dict[str, Any], dict[str, Any] | None, set[str] | None, int | None]:
        """Phase 1 (``dht_agreement.close_group``): the announcements once the round closed, the round's outcome
        records read in the same poll (None: that read failed), the live peers then (None: unknown), and the round
        the run is in when it is ahead of ours (found while waiting for a quorum: then nothing else is returned)."""
        key = f"{self.run_id}/round/{round_}"
        base_wait, base_why = self.round_wait()
        longest = self.deadline.max_wait_s if self.deadline is not None else self.round_wait_s
        view = CloseView()
        short = False
        while True:
            # one poll: the records read at once (on a slow link each lookup is several round trips)
            keys = [self.state.want_key, key, self.peers_key, f"{key}/done"] + ([self.progress_key] if short else [])
            want_records, seen, peer_records, done, *progress = self._read_many(keys)
            if progress and progress[0] is not None:
                ahead = self.run_round(progress[0], peer_records or view.heartbeats or {})
                if ahead is not None and ahead > round_:  # a quorum waits in a later round: we fell behind
                    return {}, None, None, ahead
            wants = self.state.wanted(want_records or {})
            self.state.offer_late(round_, wants)
            joiners = round_joiners(round_, self.state.expected.get(round_, set()), wants)
            wait, why = close_wait(base_wait, base_why, longest, joiners)
            now = self.clock.now()
            view = view.see(now, seen, peer_records)
            decision = close_group(now, view.first_seen, view.announced, view.live(round_), joiners, wait, deadline,
                                   why, self.min_members)
            short = decision.kind is GroupKind.QUORUM_WAIT
            if decision.close:
                self.closed[round_] = decision
                if decision.kind is GroupKind.ALL_ANNOUNCED:
                    self.spreads = (self.spreads + [view.spread])[-50:]
                else:
                    log.info("[node=%s round=%d] %s", self.name, round_, decision.reason)
                return dict(view.announced), done, view.live(round_), None
            if self._given_up():  # closed, cancelled or DHT gone: nothing more will arrive
                return {}, None, None, None

    def _publish_done(self, round_: int, fingerprint: str, committed: bool, pairs: frozenset[Pair],
                      confirmed: frozenset[str], published_at: float | None = None, wait: bool = True) -> None:
        """``wait=False``: send it and go on (an outcome repeated only as a source for peers that lack frames)."""
        outcome = Outcome(self.name, self.peer_id, fingerprint,
                          get_dht_time() if published_at is None else published_at, committed, pairs, confirmed)
        store = self._store if wait else self._store_later
        store(f"{self.run_id}/round/{round_}/done", outcome.encode(), get_dht_time() + self._record_ttl)

    def _publish_have(self, round_: int, have: HaveList) -> None:
        self._store(f"{self.run_id}/round/{round_}/have", have.encode(), get_dht_time() + self._record_ttl)

    def _supported(self, round_: int, done: dict[str, Any], haves: dict[str, HaveList], mine: str,
                   voters: int) -> Outcome | None:
        """The round's outcome among ``done`` (``dht_quorum.round_outcome``: supported, then the earliest);
        committed outcomes that their members' have-lists do not give are counted as rejected."""
        parsed = {p: Outcome.parse(p, v) for p, v in done.items()}
        outcomes = {p: o for p, o in parsed.items() if o is not None}
        for p in sorted(set(parsed) - set(outcomes)):
            self.trust.rejections.add("done", "malformed outcome", (round_, p, repr(done[p])[:200]))
        chosen, bad = round_outcome(done, outcomes, haves, voters, self.min_members, get_dht_time(),
                                    self._record_ttl, mine)
        for p, decision in bad.items():
            if decision.rejected:
                self.trust.rejections.add("done", decision.reason if decision.kind.value == "out_of_window"
                                          else f"not supported: {decision.kind.value}", (round_, p))
        return chosen

    def _read_outcome(self, round_: int, group: dict[str, Announcement], mine: str, voters: int,
                      own: HaveList | None = None) -> Outcome | None:
        """The round's supported outcome, read now; ``own``: our have-list as we hold it (a read may lag it)."""
        haves, done = self._read_many([f"{self.run_id}/round/{round_}/have", f"{self.run_id}/round/{round_}/done"])
        lists = parse_haves(haves or {}, group)
        if own is not None:
            lists[self.name] = own
        return self._supported(round_, done or {}, lists, mine, voters)

    def collect(self, round_: int, timeout_s: float, fingerprint: str | None = None) -> RoundResult:
        """The round's outcome. ``fingerprint``: an observer's reference (a member's comes from ``submit``)."""
        if self._closed:
            return RoundResult(round_, RoundStatus.CLOSED, reason="this transport is closed")
        deadline = self.clock.now() + timeout_s
        if fingerprint is not None and self.frames.latest_own(round_) is None:  # a member's is what it submitted
            self._fingerprints[round_] = fingerprint
        mine = self._fingerprints.get(round_, "")
        closed, done, live, ahead = self._close_group(round_, deadline)
        sent = self.frames.served.get(round_, 0)
        if ahead is not None:
            return RoundResult(round_, RoundStatus.RESULT_GONE, reason=f"the run is at round {ahead} and this round "
                               "has no quorum: fetching the state", bytes_sent=sent)
        parsed = {s: Announcement.parse(v) for s, v in closed.items()}
        announced = {s: a for s, a in parsed.items() if a is not None}
        if not announced:
            return RoundResult(round_, RoundStatus.TIMED_OUT, reason="no peer announced a frame before the deadline",
                               bytes_sent=sent)
        reference = same_reference(mine, announced)
        for sender, why in reference.dropped:
            self._drop_warning(round_, sender, why)
        if reference.kind is ReferenceKind.DIVERGED:
            return RoundResult(round_, RoundStatus.DIVERGED, reason=reference.reason, bytes_sent=sent)
        announced = dict(reference.members)
        # the voters: the group's members whose heartbeat is live (a crashed one's announcement outlives it), and us
        voters = len({s for s in announced if live is None or s in live} | ({self.name} & set(announced)))
        decided = None
        if done is None or done:  # an outcome was published (or the read failed): is one supported?
            decided = self._read_outcome(round_, announced, mine, voters)
        received = 0
        if decided is None:
            decided, received = self._decide(round_, announced, mine, deadline, voters)
        if isinstance(decided, RoundResult):
            return decided
        if decided is None:
            return RoundResult(round_, RoundStatus.UNDECIDED, reason="no member published the round's outcome in time",
                               bytes_sent=self.frames.served.get(round_, 0), bytes_received=received)
        if self.sharded.applies(len(decided.pairs)):
            return self.sharded.adopt(round_, decided, announced, mine, deadline, received)
        return self._adopt(round_, decided, announced, mine, deadline, received)

    def _decide(self, round_: int, announced: dict[str, Announcement], mine: str, deadline: float,
                voters: int) -> tuple[Outcome | RoundResult | None, int]:
        """Phases 2–3 for a round nobody decided yet: fetch, publish the have-list, agree, publish the outcome.
        None: this node is not a member and no member published an outcome in time. Also: bytes received.
        ``announced`` grows by the late senders another member took in (``_take_late``), and the voters with it."""
        member, first = self.name in announced, len(announced)
        held: set[Pair] = set()
        received = self._hold(round_, announced, deadline, held)
        if member:
            self._publish_have(round_, HaveList(frozenset(held), frozenset(announced)))
        have_key, done_key = f"{self.run_id}/round/{round_}/have", f"{self.run_id}/round/{round_}/done"
        until = min(deadline, self.clock.now() + self.agree_wait_s)
        refused: set[str] = set()  # late senders whose announcement is from another reference
        wants_read = self.clock.now()
        while True:
            offer = member and self.clock.now() >= wants_read + self.heartbeat_s  # a joiner asking now waits for us
            have_records, done_records, *want_records = self._read_many(
                [have_key, done_key] + ([self.state.want_key] if offer else []))
            if offer:
                self.state.offer_late(round_, self.state.wanted(want_records[0] or {}))
                wants_read = self.clock.now()
            haves = parse_haves(have_records or {}, announced)
            if member:
                haves[self.name] = HaveList(frozenset(held), frozenset(announced))  # ours as we hold it now
            decided = self._supported(round_, done_records or {}, haves, mine, voters + len(announced) - first)
            if decided is not None:
                return decided, received  # someone committed already: that is the round (we adopt it)
            if member:
                late = late_senders(haves, announced, refused)
                before = len(announced)
                received += self._take_late(round_, late, announced, mine, held, refused, deadline) if late else 0
                haves[self.name] = HaveList(frozenset(held), frozenset(announced))
                if len(announced) > before:  # our list again, over the grown group
                    self._publish_have(round_, haves[self.name])
            step = agree_step(self.clock.now(), until, haves, announced, refused, member)
            if step.done or self._given_up():
                log.debug("[node=%s round=%d] agree: %s", self.name, round_, step.reason)
                break
        if not member:
            return None, received
        voters += len(announced) - first
        agreed = agreed_set(held, haves, announced, self.min_members, voters)
        self.agreed[round_] = agreed
        for sender, why in agreed.dropped:
            self._drop_warning(round_, sender, why)
        if agreed.kind is not Verdict.COMMIT:  # the others need not wait for our outcome
            self._publish_done(round_, mine, False, frozenset(), frozenset())
            return RoundResult(round_, RoundStatus.NO_QUORUM, reason=agreed.reason,
                               bytes_sent=self.frames.served.get(round_, 0), bytes_received=received), received
        self._publish_done(round_, mine, True, agreed.pairs, agreed.confirmed)
        return self._settle(round_, announced, mine, agreed.settle_with, deadline, voters, haves[self.name]), received

    def _take_late(self, round_: int, late: set[str], announced: dict[str, Announcement], mine: str,
                   held: set[Pair], refused: set[str], deadline: float) -> int:
        """Take into the round the senders another member took in after we closed (``dht_agreement.take_late``):
        add their announcements to ``announced``, fetch their frames into ``held``. Bytes received."""
        decision = take_late(late, self._read(f"{self.run_id}/round/{round_}"), mine)
        log.debug("[node=%s round=%d] late senders: %s", self.name, round_, decision.reason)
        refused.update(decision.refused)
        if not decision.taken:
            return 0
        log.info("[node=%s round=%d] taking in %s: another member's group holds them", self.name, round_,
                 ", ".join(sorted(decision.taken)))
        announced.update(decision.taken)
        return self._hold(round_, dict(decision.taken), deadline, held)

    def _hold(self, round_: int, announced: dict[str, Announcement], deadline: float, held: set[Pair]) -> int:
        """What this member lists as held: the frames it fetched, or — for a group reduced by shard — the frames it
        saw announced (their slices are fetched once the round is decided, ``dht_sharded``). Bytes received."""
        if self.sharded.applies(len(announced) + len({s for s, _ in held})):
            held.update((s, a.sha256) for s, a in announced.items())
            return 0
        return self._fetch_announced(round_, announced, deadline, held)

    def _settle(self, round_: int, group: dict[str, Announcement], mine: str, peers: frozenset[str],
                deadline: float, voters: int, own: HaveList) -> Outcome | None:
        """Wait (≤ ``settle_s``) for the outcomes of the other members; the earliest supported one is the round's.
        ``own``: our have-list (ours counts as we hold it, whatever a read returns)."""
        keys = [f"{self.run_id}/round/{round_}/have", f"{self.run_id}/round/{round_}/done"]
        until = min(deadline, self.clock.now() + self.settle_s)
        while True:
            haves, records = self._read_many(keys)
            step = settle_step(self.clock.now(), until, records or {}, peers, self.name)
            if step.done or self._given_up():
                log.debug("[node=%s round=%d] settle: %s", self.name, round_, step.reason)
                break
        if not records or haves is None:  # the read failed (ours is in there): read again
            return self._read_outcome(round_, group, mine, voters, own)
        return self._supported(round_, records, {**parse_haves(haves, group), self.name: own}, mine, voters)

    # -- state and shutdown -------------------------------------------------------------------------------
    def fetch_state(self, timeout_s: float = 60.0) -> StateBlob | None:
        """The newest state any peer serves (asking for it through ``{run}/want``), or None within ``timeout_s``."""
        got = self.state.fetch(0, timeout_s)
        return None if got is None else StateBlob(got.offer.committed, got.blob, got.offer.fingerprint)

    def offer_state(self, committed: int, fingerprint: str, make_blob: Callable[[], bytes]) -> bool:
        return self.state.offer(committed, fingerprint, make_blob)

    def leave(self) -> None:
        self.close(announce_leave=True)

    def close(self, announce_leave: bool = True) -> None:
        """Stop heartbeats, mark this peer as gone (unless simulating a crash), drop the stream handler and
        the P2P replica, and shut down the DHT (and its p2pd) if this transport started it."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._hb is not None:
            self._hb.join(timeout=self.rpc_timeout_s + self.heartbeat_s)
        if self.dht.is_alive():  # the validator's counts live in the DHT process: take them while it runs
            ignored = self.refresh_rejections()
            if ignored:
                log.info("[node=%s] records ignored in all: %s", self.name, "; ".join(f"{k} ({n})"
                                                                               for k, n in ignored.items()))
        if announce_leave and hasattr(self, "peer_id") and self.dht.is_alive():
            self._announce_leave()
        if hasattr(self, "p2p"):
            steps = [self.p2p.remove_binary_stream_handler(self.handler_name)]
            if hasattr(self, "state"):
                steps.append(self.p2p.remove_binary_stream_handler(self.state.handler_name))
                steps.append(self.p2p.remove_binary_stream_handler(self.sharded.handler_name))
            for step in (*steps, _cancel_pending(), self.p2p.shutdown()):
                try:
                    self._run(step)
                except Exception as exc:
                    log.debug("[node=%s] P2P replica shutdown: %r", self.name, exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=self.rpc_timeout_s)
        if self.owns_dht:
            self.dht.shutdown()  # bounded by the DHT's shutdown_timeout, then terminate() (its group: dht_process)
        self.validator.close()
