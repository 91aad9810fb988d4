"""Serverless transport: leaderless rounds over hivemind's DHT, frames pulled peer to peer over its libp2p streams.

Keys (all values msgpack, every record expires):

- ``{run}/peers``          subkey=name → (peer_id, live, from_round)   heartbeat, refreshed every ``heartbeat_s``,
  ttl 3×; a peer is waited for in the rounds from ``from_round`` on (a joiner is not, while it fetches state)
- ``{run}/round/{r}``       subkey=name → (peer_id, size, sha256, reference fingerprint)   "I submitted this frame
  for round r, computed from this reference" (a retry of the round announces its new frame under the same subkey)
- ``{run}/round/{r}/have``  subkey=name → ([sender, sha256] pairs this peer fetched and verified, the senders it
  took into the round)
- ``{run}/round/{r}/done``  subkey=name → (peer_id, fingerprint, published_at, committed, pairs)   the outcome
  this peer applied

Frames are named by (sender, sha256), never by sender alone (``dht_frames``): a peer that retries a round submits
a new frame while the others may already have committed its first one, and every peer serves every frame it holds.

A round, as every peer runs it in ``collect`` (every rule below is a pure function in ``dht_agreement``, where
each is explained; this module reads and writes the records, moves the frames and calls them):

1. close (``close_group``, ``close_wait``, then ``same_reference``): wait until every live peer (and every joiner
   this peer just gave the state of this round) announced, or the round's wait after the first announcement this
   peer saw (bounded by ``timeout_s``); the group G = the announcements read then. The wait adapts as in the
   coordinator (``node.membership.round_wait``: clamp(margin × quantile of this peer's recent first-to-last
   announcement spreads)) when a ``DeadlinePolicy`` is given, else it is the fixed ``round_wait_s``.
   Members whose announced reference differs from ours are left out; if another reference is held by more
   members, ours is the diverged one and the result says ``state_needed`` (the daemon fetches the state).
2. decided already (``choose_outcome``)? If a peer with our reference published a committed outcome, that *is*
   the round: adopt it (step 5). This is how a peer that retries the round, arrives late, or only observes gets
   the same result.
3. fetch and agree (``take_late``, ``agree_step``, ``agreed_set``): pull every member's announced frame by its
   sha256 (a stream must keep moving, ``fetch_timeout_s`` per step: a large frame on a slow link takes what it
   takes, a stalled one fails); publish ``have``; wait (≤ ``agree_wait_s``) until every member of G published a
   have-list over all of G (or an outcome, then step 5). A sender in another member's group but not in ours (it
   announced after we closed, or its join record reached that member first) is taken in: its frame fetched, our
   list published again. The set is (what I hold) ∩ (every have-list received) restricted to the members that
   published one. A frame any member tried and failed to get is dropped by everyone who reads that member's list.
4. publish the outcome (committed only with ≥ ``min_members`` frames, else a "not committed" record so no one
   waits for us), then settle (``settle_step``): wait (≤ ``settle_s``) for the outcomes of the other members. The
   earliest published committed outcome (ties: the publisher's name) is the round's, for everyone that reads it —
   members whose have-list reads raced at a deadline find out here and all apply the same set.
5. adopt (``adopt_sources``): commit exactly that outcome's frames, fetching any we lack from their senders or from
   the peers that published the outcome; if none can serve one, ``state_needed``.

Limits, stated plainly:
- Not Byzantine-fault tolerant: a peer can lie in its have-list or outcome; peers are trusted to run this code.
  sha256 only catches corruption / mismatched serving.
- Two members that publish different outcomes, each without seeing the other's within ``settle_s``, keep them;
  that needs a have-list race at the agree deadline *and* a stall of one of them through the settle wait. The
  minority then sees it in the next round's announcements (the reference fingerprints differ) and fetches the
  state.
- A latecomer that announced after every member closed is left out; one that some member took in is taken in
  by all that read that member's list within the agree wait.
- State for joiners is served by the peers themselves (``dht_state.StateShare``: chunked, multi-donor).
- Leave is announced by a (peer, False) record; hivemind cannot shorten a record's expiration.

Waits: the round's close, agree and settle waits and the poll interval are decided on an injected clock
(``node.clock``; production ``SYSTEM_CLOCK``). The heartbeat period is real time: it keeps a record alive whose
expiry is DHT (wall) time. Faults for tests come through ``dht_faults.DhtFaults`` (``create(..., faults=...)``).
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
from node.membership import DeadlinePolicy, round_wait
from node.transport.dht_agreement import (AgreeDecision, Announcement, CloseView, GroupDecision, GroupKind, HaveList,
                                          Outcome, Pair, ReferenceKind, Verdict, adopt_sources, agree_step,
                                          agreed_set, choose_outcome, close_group, close_wait, commit_reason,
                                          late_senders, live_members, parse_haves, round_joiners, same_reference,
                                          settle_step, take_late)
from node.transport.dht_faults import DhtFaults
from node.transport.dht_frames import KEEP_OWN_ROUNDS, FramePool
from node.transport.dht_records import BoundedDht
from node.transport.dht_state import DEFAULT_CHUNK, StateShare
from node.transport.messages import RoundResult, RoundStatus, StateBlob

log = logging.getLogger(__name__)


async def _cancel_pending() -> None:
    """Cancel what still runs on the loop (e.g. serving a frame to a slow peer), so it ends while the loop lives."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=1.0)


class DhtTransport(BoundedDht):
    def __init__(self, run_id: str, name: str, dht: hivemind.DHT, round_wait_s: float = 5.0, *,
                 first_round: int = 0, heartbeat_s: float = 1.0, rpc_timeout_s: float = 5.0,
                 fetch_timeout_s: float = 10.0, agree_wait_s: float | None = None, poll_s: float = 0.05,
                 owns_dht: bool = False, deadline: DeadlinePolicy | None = None,
                 state_chunk_bytes: int = DEFAULT_CHUNK, cancel: threading.Event | None = None,
                 min_members: int = 1, settle_s: float = 2.0, clock: Clock = SYSTEM_CLOCK,
                 faults: DhtFaults | None = None) -> None:
        self.run_id, self.name, self.dht = run_id, name, dht
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
        self.handler_name = f"lowband.{run_id}.frame"
        self.frames = FramePool(name, self.handler_name, fetch_timeout_s, self.faults)
        self._fingerprints: dict[int, str] = {}  # round → our reference fingerprint when we submitted
        # round → how it closed and what was agreed, for recent rounds (logs, benchmarks, tests read them)
        self.closed: dict[int, GroupDecision] = {}
        self.agreed: dict[int, AgreeDecision] = {}
        self._lock = threading.Lock()  # serialises sends into the DHT's pipe
        self._background: set[Any] = set()  # stores sent without waiting (``_store_later``)
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
        except BaseException:
            self.close(announce_leave=False)
            raise

    @classmethod
    def create(cls, run_id: str, name: str, initial_peers: Sequence[str] = (), *,
               host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",), nat_port_map: bool = False,
               auto_nat: bool = False, use_relay: bool = False, client_mode: bool = False,
               identity_path: str | None = None, announce_maddrs: Sequence[str] = (), start_timeout_s: float = 30.0,
               **kw: Any) -> "DhtTransport":
        """Start a DHT (and its p2pd) owned by the transport: ``close``/``leave`` shut it down.
        NAT traversal is off unless asked for, so nothing but ``host_maddrs`` is touched. ``announce_maddrs``:
        what the others dial instead of the listen addresses (a forwarded port, a relay in front of this peer)."""
        extra: dict[str, Any] = {"identity_path": identity_path} if identity_path else {}
        if announce_maddrs:
            extra["announce_maddrs"] = list(announce_maddrs)
        dht = hivemind.DHT(initial_peers=list(initial_peers), host_maddrs=list(host_maddrs), start=True,
                           await_ready=False, nat_port_map=nat_port_map, auto_nat=auto_nat, use_relay=use_relay,
                           client_mode=client_mode, **extra)
        try:
            dht.wait_until_ready(timeout=start_timeout_s)
        except BaseException:
            dht.shutdown()
            raise
        return cls(run_id, name, dht, owns_dht=True, **kw)

    def visible_maddrs(self) -> list[str]:
        return [str(m) for m in self._dht_future(self.dht.run_coroutine, hivemind.DHT._get_visible_maddrs)]

    # -- membership ---------------------------------------------------------------------------------------
    def live_peers(self, round_: int | None = None, records: dict[str, Any] | None = None) -> set[str]:
        """Peers with a live heartbeat (that take part in ``round_``, if given). ``records``: the peers key, if the
        caller read it already."""
        return live_members(self._read(f"{self.run_id}/peers") if records is None else records, round_)

    def _heartbeat(self) -> None:
        self._hb_expiration = get_dht_time() + 3 * self.heartbeat_s
        self._store(f"{self.run_id}/peers", self.name, (self.peer_id, True, self.from_round), self._hb_expiration)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):  # real time: the record expires in DHT time
            self._heartbeat()

    def join(self, from_round: int | None = None) -> set[str]:
        """Start heartbeats: from now on the peers wait for this peer's frame in rounds ≥ ``from_round``."""
        if from_round is not None:
            self.from_round = from_round
        self.joined = True
        self._heartbeat()
        if self._hb is None:
            self._hb = threading.Thread(target=self._heartbeat_loop, name=f"dht-hb-{self.name}", daemon=True)
            self._hb.start()
        return self.live_peers() | {self.name}

    # -- a round ------------------------------------------------------------------------------------------
    def submit(self, round_: int, payload: bytes, fingerprint: str = "") -> None:
        """Announce and serve ``payload`` for ``round_``. ``fingerprint``: this replica's reference before the round
        (peers whose reference differs are kept out of each other's rounds; "" = not checked). Submitting again for
        the same round (a retry) announces the new frame; the earlier ones stay served."""
        sha = self.frames.add_own(round_, payload)
        with self._lock:
            self._fingerprints[round_] = fingerprint
            for old in [r for r in self._fingerprints if r <= round_ - KEEP_OWN_ROUNDS]:
                for table in (self._fingerprints, self.closed, self.agreed):
                    table.pop(old, None)
            for old in [r for r in self.state.expected if r < round_]:
                self.state.expected.pop(old, None)
        value = Announcement(self.peer_id, len(payload), sha, fingerprint)
        self._store(f"{self.run_id}/round/{round_}", self.name, tuple(value), get_dht_time() + self._record_ttl)

    @property
    def _record_ttl(self) -> float:
        return max(60.0, 4 * (self.round_wait_s + self.agree_wait_s))

    def _given_up(self) -> bool:
        """Wait one poll interval; True when waiting longer is pointless (closed, cancelled, DHT process gone)."""
        return self.clock.sleep(self.poll_s, self._stop) or self.cancel.is_set() or not self.dht.is_alive()

    def round_wait(self) -> tuple[float, str]:
        if self.deadline is None:
            return self.round_wait_s, f"fixed {self.round_wait_s:.1f} s"
        return round_wait(self.spreads, self.deadline)

    def _close_group(self, round_: int, deadline: float) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Phase 1 (``dht_agreement.close_group``): the announcements once the round closed, and the round's outcome
        records read in the same poll (None: that read failed)."""
        key = f"{self.run_id}/round/{round_}"
        base_wait, base_why = self.round_wait()
        longest = self.deadline.max_wait_s if self.deadline is not None else self.round_wait_s
        view = CloseView()
        while True:
            # one poll: the four records read at once (on a slow link each lookup is several round trips)
            want_records, seen, peer_records, done = self._read_many(
                [self.state.want_key, key, f"{self.run_id}/peers", f"{key}/done"])
            wants = self.state.wanted(want_records or {})
            self.state.offer_late(round_, wants)
            joiners = round_joiners(round_, self.state.expected.get(round_, set()), wants)
            wait, why = close_wait(base_wait, base_why, longest, joiners)
            now = self.clock.now()
            view = view.see(now, seen, peer_records)
            decision = close_group(now, view.first_seen, view.announced, view.live(round_), joiners, wait, deadline,
                                   why)
            if decision.close:
                self.closed[round_] = decision
                if decision.kind is GroupKind.ALL_ANNOUNCED:
                    self.spreads = (self.spreads + [view.spread])[-50:]
                else:
                    log.info("[node=%s round=%d] %s", self.name, round_, decision.reason)
                return dict(view.announced), done
            if self._given_up():  # closed, cancelled or DHT gone: nothing more will arrive
                return {}, None

    def _publish_done(self, round_: int, fingerprint: str, committed: bool, pairs: frozenset[Pair],
                      published_at: float | None = None, wait: bool = True) -> None:
        """``wait=False``: send it and go on (an outcome repeated only as a source for peers that lack frames)."""
        outcome = Outcome(self.name, self.peer_id, fingerprint,
                          get_dht_time() if published_at is None else published_at, committed, pairs)
        store = self._store if wait else self._store_later
        store(f"{self.run_id}/round/{round_}/done", self.name, outcome.encode(), get_dht_time() + self._record_ttl)

    def _publish_have(self, round_: int, have: HaveList) -> None:
        self._store(f"{self.run_id}/round/{round_}/have", self.name, have.encode(), get_dht_time() + self._record_ttl)

    def _read_outcome(self, round_: int, mine: str) -> Outcome | None:
        return choose_outcome(self._read(f"{self.run_id}/round/{round_}/done"), mine)

    def collect(self, round_: int, timeout_s: float, fingerprint: str | None = None) -> RoundResult:
        """The round's outcome. ``fingerprint``: an observer's reference (a member's comes from ``submit``)."""
        if self._closed:
            return RoundResult(round_, RoundStatus.CLOSED, reason="this transport is closed")
        deadline = self.clock.now() + timeout_s
        if fingerprint is not None and self.frames.latest_own(round_) is None:  # a member's is what it submitted
            self._fingerprints[round_] = fingerprint
        mine = self._fingerprints.get(round_, "")
        closed, done = self._close_group(round_, deadline)
        parsed = {s: Announcement.parse(v) for s, v in closed.items()}
        announced = {s: a for s, a in parsed.items() if a is not None}
        sent = self.frames.served.get(round_, 0)
        if not announced:
            return RoundResult(round_, RoundStatus.TIMED_OUT, reason="no peer announced a frame before the deadline",
                               bytes_sent=sent)
        reference = same_reference(mine, announced)
        for sender, why in reference.dropped:
            log.warning("[node=%s round=%d] dropped %s: %s", self.name, round_, sender, why)
        if reference.kind is ReferenceKind.DIVERGED:
            return RoundResult(round_, RoundStatus.DIVERGED, reason=reference.reason, bytes_sent=sent)
        announced = dict(reference.members)
        # done: read with the announcements (None: that read failed, read it now)
        decided = self._read_outcome(round_, mine) if done is None else choose_outcome(done, mine)
        received = 0
        if decided is None:
            decided, received = self._decide(round_, announced, mine, deadline)
        if isinstance(decided, RoundResult):
            return decided
        if decided is None:
            return RoundResult(round_, RoundStatus.UNDECIDED, reason="no member published the round's outcome in time",
                               bytes_sent=self.frames.served.get(round_, 0), bytes_received=received)
        return self._adopt(round_, decided, announced, mine, deadline, received)

    def _fetch(self, round_: int, wanted: dict[str, tuple[list[str], int | None, str]],
               deadline: float) -> tuple[dict[str, bytes | str], int]:
        """Pull frames: results, bytes received. A stream must keep moving (``fetch_timeout_s`` per step) and
        retries end after ``fetch_timeout_s``; a transfer that moves may run to the caller's deadline (a large frame
        on a slow link)."""
        before = {s for s, (_src, _size, sha) in wanted.items() if self.frames.get(round_, sha) is not None}
        left = max(0.1, deadline - self.clock.now())
        budget = min(self.fetch_timeout_s, left)
        try:
            got = self._run(self.frames.fetch_all(self.p2p, round_, wanted, budget, longest=left),
                            timeout=left + self.rpc_timeout_s)
        except Exception as exc:  # only if the loop itself is gone; each fetch is bounded on its own
            got = {s: f"fetch failed: {exc!r}" for s in wanted}
        received = sum(len(v) for s, v in got.items() if isinstance(v, bytes) and s not in before)
        return got, received

    def _fetch_announced(self, round_: int, announced: dict[str, Announcement], deadline: float,
                         held: set[Pair]) -> int:
        """Fetch the frames of ``announced`` into ``held`` (a frame that cannot be had is logged and left out);
        bytes received."""
        fetched, received = self._fetch(round_, {s: ([a.peer_id], a.size, a.sha256) for s, a in announced.items()},
                                        deadline)
        for sender, got in sorted(fetched.items()):
            if isinstance(got, bytes):
                held.add((sender, announced[sender].sha256))
            else:
                log.warning("[node=%s round=%d] dropped %s: %s", self.name, round_, sender, got)
        return received

    def _decide(self, round_: int, announced: dict[str, Announcement], mine: str,
                deadline: float) -> tuple[Outcome | RoundResult | None, int]:
        """Phases 2–3 for a round nobody decided yet: fetch, publish the have-list, agree, publish the outcome.
        None: this node is not a member and no member published an outcome in time. Also: bytes received.
        ``announced`` grows by the late senders another member took in (``_take_late``)."""
        member = self.name in announced
        held: set[Pair] = set()
        received = self._fetch_announced(round_, announced, deadline, held)
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
            decided = choose_outcome(done_records or {}, mine)
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
        agreed = agreed_set(held, haves, announced, self.min_members)
        self.agreed[round_] = agreed
        for sender, why in agreed.dropped:
            log.warning("[node=%s round=%d] dropped %s: %s", self.name, round_, sender, why)
        if agreed.kind is not Verdict.COMMIT:
            self._publish_done(round_, mine, False, frozenset())  # the others need not wait for our outcome
            return RoundResult(round_, RoundStatus.NO_QUORUM, reason=agreed.reason,
                               bytes_sent=self.frames.served.get(round_, 0), bytes_received=received), received
        self._publish_done(round_, mine, True, agreed.pairs)
        return self._settle(round_, mine, agreed.settle_with, deadline), received

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
        return self._fetch_announced(round_, dict(decision.taken), deadline, held)

    def _settle(self, round_: int, mine: str, peers: frozenset[str], deadline: float) -> Outcome | None:
        """Wait (≤ ``settle_s``) for the outcomes of the other members; the earliest published one is the round's."""
        done_key = f"{self.run_id}/round/{round_}/done"
        until = min(deadline, self.clock.now() + self.settle_s)
        while True:
            records = self._read(done_key)
            step = settle_step(self.clock.now(), until, records, peers, self.name)
            if step.done or self._given_up():
                log.debug("[node=%s round=%d] settle: %s", self.name, round_, step.reason)
                break
        # empty: the read failed (ours is in there), read again
        return choose_outcome(records, mine) if records else self._read_outcome(round_, mine)

    def _adopt(self, round_: int, outcome: Outcome, announced: dict[str, Announcement], mine: str, deadline: float,
               received: int) -> RoundResult:
        """Commit exactly ``outcome``'s frames (``dht_agreement.adopt_sources``). A frame none can serve means
        fetching the state."""
        fetched, more = self._fetch(round_, adopt_sources(outcome, announced), deadline)
        received += more
        sent = self.frames.served.get(round_, 0)
        lacking = sorted(s for s, got in fetched.items() if not isinstance(got, bytes))
        if lacking:
            return RoundResult(round_, RoundStatus.FRAMES_UNAVAILABLE, reason="the members agreed on frames this "
                               f"node could not get ({', '.join(lacking)}): fetching the state instead",
                               bytes_sent=sent, bytes_received=received)
        if outcome.publisher != self.name:  # the same outcome again: more sources for peers that missed frames
            self._publish_done(round_, mine, True, outcome.pairs, outcome.published_at, wait=False)
            if self.name in announced and (self.name, announced[self.name].sha256) not in outcome.pairs:
                log.info("[node=%s round=%d] %s decided the round without our latest frame", self.name, round_,
                         outcome.publisher)
        payloads = {s: f for s, f in sorted(fetched.items()) if isinstance(f, bytes)}  # all of them (none lacking)
        return RoundResult(round_, RoundStatus.COMMITTED, payloads, reason=commit_reason(announced, payloads),
                           bytes_sent=sent, bytes_received=received)

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
        if announce_leave and hasattr(self, "peer_id") and self.dht.is_alive():
            # hivemind keeps the record with the later expiration: outlive the last heartbeat
            expiration = max(self._hb_expiration, get_dht_time()) + 1.0
            self._store(f"{self.run_id}/peers", self.name, (self.peer_id, False), expiration)
        if hasattr(self, "p2p"):
            steps = [self.p2p.remove_binary_stream_handler(self.handler_name)]
            if hasattr(self, "state"):
                steps.append(self.p2p.remove_binary_stream_handler(self.state.handler_name))
            for step in (*steps, _cancel_pending(), self.p2p.shutdown()):
                try:
                    self._run(step)
                except Exception as exc:
                    log.debug("[node=%s] P2P replica shutdown: %r", self.name, exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=self.rpc_timeout_s)
        if self.owns_dht:
            self.dht.shutdown()  # bounded by the DHT's shutdown_timeout, then terminate()
