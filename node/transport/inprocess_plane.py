"""An in-process run: a coordinator in miniature that N daemons in one process join through ``InProcessPlane``
(a ``ControlPlane``). It lets the real ``NodeDaemon`` — overlap, step-in, late rounds, rejoin, fingerprint checks —
run in a test, in threads, in seconds, with faults injected by ``faults.FaultyPlane``.

It keeps the coordinator's rules where a daemon can tell the difference, using the same pure policies
(node/membership.py): a round closes once every expected member submitted (observers are not waited for once the
round holds a quorum) or at ``first payload + round_wait_s`` with at least ``min_nodes`` payloads; frames are
validated on arrival (an invalid one is refused, as the coordinator's INVALID_ARGUMENT); the run holds the
reference, applies every committed round, publishes its fingerprint with each result and serves its state to
joiners; a joiner contributes from the next round once the open round has a payload. Members that join with a public
key (``Identity.public_key``) have their frames' signatures verified on arrival, and every result hands the round's
senders' keys to the nodes (``RoundResult.member_keys``), as the coordinator does. With a recipe's ``reduce`` on, a
member the round's report evicts is removed (its plane reports ``lost``) and refused when it joins again, the reason
logged. What it leaves out: leases (a plane that closes without leaving is gone at once, as a dropped connection would
be noticed) and bytes on a wire (sizes are counted as a relay moves them).
"""
from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable

from node import wire
from node.clock import SYSTEM_CLOCK, Clock
from node.config import RunConfig
from node.errors import PayloadError
from node.keyring import KeyRing
from node.membership import MembershipPolicy, decide_close
from node.tasks.base import Task, build_seeded
from node.train.reference import Reference
from node.transport.control import Identity, JoinInfo, JoinRefused, Rejoin, Stopped
from node.transport.messages import RoundResult, RoundStatus, StateBlob, Submission

log = logging.getLogger(__name__)
POLL_S = 0.05  # how often a waiter re-checks a deadline on the run's clock


@dataclass
class _Member:
    first_round: int
    shard: int
    plane: "InProcessPlane"


@dataclass
class _Closed:
    frames: dict[str, bytes]  # sender → frame, sorted
    fingerprint: str  # the reference after the round
    keys: dict[str, bytes] = field(default_factory=dict)  # sender → its public key, where it joined with one


@dataclass
class _Open:
    round: int
    frames: dict[str, Submission] = field(default_factory=dict)
    observers: set[str] = field(default_factory=set)
    first_at: float | None = None


class _Resubmit(Exception):
    """The run restarted while a member waited for its round: the frame it submitted is gone."""


class InProcessRun:
    """The run. ``task`` builds the reference (the same seed as the nodes); ``round_wait_s``: how long a round
    stays open after its first payload (inf: until every expected member submitted)."""

    def __init__(self, run: RunConfig, task: Task, *, min_nodes: int = 1, num_shards: int = 64,
                 round_wait_s: float = math.inf, keep_results: int = 8, clock: Clock = SYSTEM_CLOCK) -> None:
        self.run, self.clock = run, clock
        self.policy = MembershipPolicy(min_nodes=min_nodes, max_nodes=num_shards)
        self.round_wait_s, self.keep_results = round_wait_s, keep_results
        self.reference = Reference.for_model(run, build_seeded(task, run.seed))
        self.limit = wire.max_frame_size(self.reference.codec, self.reference.spec, self.reference.buffer_spec)
        self.members: dict[str, _Member] = {}
        self.open = _Open(0)
        self.results: OrderedDict[int, _Closed] = OrderedDict()
        self.generation = 0  # bumped by ``restart``: submissions held before it are gone
        self.cond = threading.Condition()  # re-entrant: ``on_frame`` may call back into the run
        #: called (under the run's lock) with (round, frames held) each time the open round accepts a frame: where a
        #: test makes something happen at an exact point of a run (restart it, start a joiner)
        self.on_frame: Callable[[int, int], None] | None = None
        self.held_from: int | None = None  # rounds from this one on do not close (``hold``)
        self.start_with = min_nodes  # members that must have joined before round 0 can close (``start_when``)
        self.keys: dict[str, bytes] = {}  # name → the public key it joined with (kept after it leaves)
        self.evicted: dict[str, str] = {}  # name → why the run evicted it (reduce on)

    def plane(self, name: str, stop: threading.Event | None = None) -> "InProcessPlane":
        return InProcessPlane(self, name, stop or threading.Event())

    # -- what a test does to the run ------------------------------------------------------------------------
    def expire(self, name: str) -> None:
        """Forget a member as a lease expiry would: its plane reports ``lost`` and its next request ``Rejoin``."""
        with self.cond:
            m = self.members.pop(name, None)
            if m is not None:
                m.plane.lost.set()
            self._maybe_close()
            self.cond.notify_all()

    def start_when(self, joined: int) -> None:
        """Keep round 0 open to joiners (each of them contributes to it) until ``joined`` members are in: nodes
        started together then all start the run, however their start-ups interleave."""
        with self.cond:
            self.start_with = max(self.policy.min_nodes, joined)

    def hold(self, round_: int) -> None:
        """Keep round ``round_`` and later ones open (members wait in them) until ``release``: a slow network,
        under a test's control."""
        with self.cond:
            self.held_from = round_

    def release(self) -> None:
        with self.cond:
            self.held_from = None
            self._maybe_close()
            self.cond.notify_all()

    def restart(self) -> None:
        """Lose what a coordinator restart loses: the payloads held for the open round (members stay)."""
        with self.cond:
            self.open = _Open(self.open.round)
            self.generation += 1
            self.cond.notify_all()

    # -- rules ----------------------------------------------------------------------------------------------
    def keyring(self, senders: Iterable[str] | None = None) -> KeyRing | None:
        """The keys of ``senders`` (default: every member that joined with one); None when nobody joined with one."""
        if not self.keys:
            return None
        return KeyRing({s: self.keys[s] for s in (self.keys if senders is None else senders) if s in self.keys})

    def _started(self) -> bool:
        return self.open.round > 0 or len(self.members) >= self.start_with

    def _maybe_close(self) -> None:
        if not self._started() or not self.open.frames:
            return
        if self.held_from is not None and self.open.round >= self.held_from:
            return
        submitted = set(self.open.frames)
        expected = {n for n, m in self.members.items() if m.first_round <= self.open.round}
        if len(submitted) >= self.policy.min_nodes:
            expected -= self.open.observers
        deadline = None if self.open.first_at is None else self.open.first_at + self.round_wait_s
        decision = decide_close(self.clock.now(), expected, submitted, deadline, self.policy)
        if not decision.close:
            return
        r = self.open.round
        frames = {s: self.open.frames[s].frame for s in decision.members}
        keys = self.keyring(frames)
        envelopes, rejected = self.reference.unpack(frames, r, keys)
        assert not rejected, f"frames were validated on arrival: {rejected}"
        self.reference.apply(envelopes, r)
        report = self.reference.last_report
        for name, reason in sorted(report.evicted.items()) if report is not None else ():
            log.warning("[round=%d] %s evicted: %s", r, name, reason)
            self.evicted[name] = reason
            m = self.members.pop(name, None)
            if m is not None:
                m.plane.lost.set()
        self.results[r] = _Closed(dict(sorted(frames.items())), self.reference.fingerprint(),
                                  dict(keys) if keys is not None else {})
        while len(self.results) > self.keep_results:
            self.results.popitem(last=False)
        self.open = _Open(r + 1)
        self.cond.notify_all()

    def _result(self, name: str, round_: int, own: bytes | None) -> RoundResult:
        closed = self.results.get(round_)
        if closed is None:
            return RoundResult(round_, RoundStatus.RESULT_GONE, reason=f"the result of round {round_} is no longer "
                               f"held (the run is at round {self.open.round}); fetch the state instead")
        sent = len(own) if own is not None and name in closed.frames else 0
        received = sum(len(f) for s, f in closed.frames.items() if s != name)
        return RoundResult(round_, RoundStatus.COMMITTED, dict(closed.frames), reason="committed",
                           bytes_sent=sent, bytes_received=received, reference_fingerprint=closed.fingerprint,
                           member_keys=dict(closed.keys))

    def _wait(self, round_: int, until: float, stop: threading.Event, check: Callable[[], None]) -> bool:
        """Wait (holding ``cond``) until ``round_`` closed; False at ``until`` (on the run's clock)."""
        while self.open.round <= round_:
            check()
            if stop.is_set():
                raise Stopped()
            if self.clock.now() >= until:
                return False
            self._maybe_close()
            if self.open.round > round_:
                break
            self.cond.wait(POLL_S if self.open.first_at is not None else 1.0)
        return True


class InProcessPlane:
    """One daemon's ``ControlPlane`` on an ``InProcessRun``."""

    serves_past_results = True  # the run keeps ``keep_results`` results

    def __init__(self, run: InProcessRun, name: str, stop: threading.Event) -> None:
        self.r, self.name, self.stop = run, name, stop
        self.where = "in-process"
        self.lost = threading.Event()
        self.left = False

    @property
    def current_round(self) -> int:
        return self.r.open.round

    def get_run_config(self) -> RunConfig:
        return self.r.run

    def _check(self) -> None:
        if self.lost.is_set() or self.r.members.get(self.name, None) is None or \
                self.r.members[self.name].plane is not self:
            raise Rejoin(f"{self.name} is not a member of the run")

    def join(self, identity: Identity) -> JoinInfo:
        r = self.r
        with r.cond:
            held = r.members.get(self.name)
            if held is not None and held.plane is not self and not held.plane.left:
                raise JoinRefused(f"a live member is already named {self.name!r}")
            if self.name in r.evicted:
                raise JoinRefused(f"{self.name} was evicted from the run: {r.evicted[self.name]}")
            if identity.public_key:
                r.keys[self.name] = identity.public_key
            taken = {m.shard for n, m in r.members.items() if n != self.name}
            shard = next(s for s in range(r.policy.max_nodes) if s not in taken)
            first = r.open.round if not r.open.frames or not r._started() else r.open.round + 1
            r.members[self.name] = _Member(first, shard, self)
            self.lost.clear()
            self.left = False
            r._maybe_close()
            r.cond.notify_all()
            return JoinInfo(shard, r.policy.max_nodes, first, r.reference.committed_rounds)

    def exchange(self, submission: Submission, timeout_s: float) -> RoundResult:
        r, sub = self.r, submission
        until = r.clock.now() + timeout_s
        with r.cond:
            self._check()
            while True:
                generation = r.generation
                accepted = self._submit(sub)

                def check() -> None:
                    self._check()
                    if r.generation != generation:
                        raise _Resubmit()

                try:
                    closed = r._wait(sub.round, until, self.stop, check)
                except _Resubmit:
                    continue  # the run restarted while we waited and lost our frame: offer it again
                if closed:
                    return r._result(self.name, sub.round, sub.frame if accepted else None)
                return RoundResult(sub.round, RoundStatus.TIMED_OUT,
                                   reason=f"round {sub.round} did not close within {timeout_s:.0f} s")

    def _submit(self, sub: Submission) -> bool:
        """Offer the frame to the open round (holding ``cond``); False when it is refused or late."""
        r = self.r
        if sub.round != r.open.round or r.members[self.name].first_round > sub.round:
            return False  # late (the round closed without it) or not ours to contribute to
        try:
            wire.unpack(sub.frame, r.reference.codec, r.reference.spec, r.run.run_id, sub.round, limit=r.limit,
                        extra_spec=r.reference.buffer_spec, sender=self.name, keys=r.keyring())
        except PayloadError as exc:
            log.warning("[round=%d] refused %s's frame: %s", sub.round, self.name, exc)
            return False  # refused, as the coordinator's INVALID_ARGUMENT: the round goes on without it
        if r.open.first_at is None:
            r.open.first_at = r.clock.now()
        held = r.open.frames.setdefault(self.name, sub)  # a duplicate keeps the first
        if r.on_frame is not None:
            r.on_frame(sub.round, len(r.open.frames))
        r._maybe_close()
        r.cond.notify_all()
        return held.frame == sub.frame

    def observe(self, round_: int, timeout_s: float, fingerprint: str = "") -> RoundResult:
        r = self.r
        with r.cond:
            self._check()
            if round_ == r.open.round:
                r.open.observers.add(self.name)
                r._maybe_close()
            if not r._wait(round_, r.clock.now() + timeout_s, self.stop, self._check):
                return RoundResult(round_, RoundStatus.TIMED_OUT, reason=f"round {round_} did not close in time")
            return r._result(self.name, round_, None)

    def round_started(self, round_: int) -> bool | None:
        r = self.r
        with r.cond:
            return r.open.round > round_ or (r.open.round == round_ and bool(r.open.frames))

    def fetch_state(self, after_round: int | None, timeout_s: float, at_least: int = 0) -> StateBlob | None:
        r = self.r  # the live state is always the newest: ``at_least`` holds
        with r.cond:
            if after_round is not None and not r._wait(after_round, r.clock.now() + timeout_s, self.stop,
                                                       lambda: None):
                return None
            ref = r.reference
            return StateBlob(ref.committed_rounds, ref.to_bytes(), ref.fingerprint())

    def offer_state(self, committed: int, fingerprint: str, make_blob: Callable[[], bytes]) -> None:
        pass  # the run serves the state

    def leave(self, reason: str) -> None:
        with self.r.cond:
            self.left = True
            m = self.r.members.get(self.name)
            if m is not None and m.plane is self:
                del self.r.members[self.name]
            self.r._maybe_close()
            self.r.cond.notify_all()

    def close(self) -> None:
        """A plane closed without leaving is a connection gone: the run stops waiting for it at once."""
        if not self.left:
            self.leave("connection closed")
