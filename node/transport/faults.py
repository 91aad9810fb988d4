"""The fault seam: a ``ControlPlane`` wrapper that injects faults from a seeded schedule, in the spirit of torchft's
``FailureInjector().fail_at(...)``. Tests (tests/fault/) wrap any plane — in-process, gRPC, DHT — with it instead of
replacing private methods, and the same schedule gives the same faults on every run.

What each fault does to one node's exchange of one round (the node's code sees only what a real network would
give it):

- ``DROP``: the frame never arrives; the round goes on without it and the node learns the result (its update stays
  in error feedback). If the round cannot close without it (every frame was lost), the node's wait ends after
  ``lost_wait_s`` with the round not committed, and the node offers the same frame again next time, as after any
  round that timed out.
- ``DELAY``: the frame arrives after the round closed: the round is decided without it (waiting at most
  ``lost_wait_s`` for that), then the late frame is offered.
- ``CORRUPT``: one byte of the frame flips on the way up: every receiver refuses it (the wire digest).
- ``DUPLICATE``: the frame is delivered twice; the second delivery must change nothing.
- ``CORRUPT_RESULT``: one byte of another member's payload flips on the way down: this node refuses that payload,
  reduces fewer frames than the others and its replica diverges (the fingerprint check must catch it).
- ``FORGET``: the run no longer knows the node when it offers its frame (its lease expired while it was cut off):
  the exchange raises ``Rejoin``, as a coordinator's NOT_FOUND does, and the node joins again.
- ``LOST_REPLY``: the frame reaches the round and the round commits with it, but the reply never reaches the node,
  and by the time it asks again the run has forgotten it (a pause longer than its lease): the exchange raises
  ``Rejoin`` after the round closed. The node must still count the round as one it took part in.
- ``CRASH``: the node dies at this round before its frame leaves, as under ``kill -9``: ``NodeCrashed`` is raised
  and the plane is closed without leaving (a restarted daemon takes over from its workdir).
- ``STALE_STATE``: the next state the node fetches after this round is the oldest state it offered (after its first
  round), as a coordinator whose newest snapshot is older than the node's own round serves it.
"""
from __future__ import annotations

import dataclasses
import enum
import random
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from node.config import RunConfig
from node.transport.control import ControlPlane, Identity, JoinInfo, Rejoin
from node.transport.messages import RoundResult, StateBlob, Submission


class Fault(str, enum.Enum):
    DROP = "drop"
    DELAY = "delay"
    CORRUPT = "corrupt"
    DUPLICATE = "duplicate"
    CORRUPT_RESULT = "corrupt_result"
    FORGET = "forget"
    CRASH = "crash"
    STALE_STATE = "stale_state"
    LOST_REPLY = "lost_reply"


class NodeCrashed(BaseException):
    """Raised by ``FaultyPlane`` at a ``CRASH``: the node is dead (a BaseException, so no ``except Exception`` in the
    daemon turns it into an orderly exit with a checkpoint and a Leave)."""


@dataclass(frozen=True)
class Injection:
    node: str
    round: int
    fault: Fault


class FaultSchedule:
    """Which fault hits which node at which round. Each scheduled fault fires once; ``fired`` lists them in order."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self._due: dict[tuple[str, int], list[Fault]] = {}
        self.fired: list[Injection] = []
        self._lock = threading.Lock()

    def fail_at(self, node: str, round_: int, fault: Fault) -> "FaultSchedule":
        with self._lock:
            self._due.setdefault((node, round_), []).append(Fault(fault))
        return self

    def random(self, nodes: Iterable[str], rounds: range, rate: float,
               faults: Iterable[Fault] = (Fault.DROP, Fault.DELAY, Fault.CORRUPT, Fault.DUPLICATE)) -> "FaultSchedule":
        """Each (node, round) gets one of ``faults`` with probability ``rate``, drawn from the seed."""
        kinds = list(faults)
        for node in sorted(nodes):
            for r in rounds:
                if self.rng.random() < rate:
                    self.fail_at(node, r, self.rng.choice(kinds))
        return self

    def take(self, node: str, round_: int) -> list[Fault]:
        with self._lock:
            due = self._due.pop((node, round_), [])
            self.fired.extend(Injection(node, round_, f) for f in due)
            return due

    @property
    def pending(self) -> list[Injection]:
        with self._lock:
            return [Injection(n, r, f) for (n, r), fs in sorted(self._due.items()) for f in fs]


def flip_byte(data: bytes, rng: random.Random) -> bytes:
    """``data`` with one byte (at a seeded position) changed."""
    if not data:
        return data
    i = rng.randrange(len(data))
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]


class FaultyPlane:
    """``inner`` with ``schedule``'s faults applied to the exchanges of node ``name``."""

    def __init__(self, inner: ControlPlane, name: str, schedule: FaultSchedule, lost_wait_s: float = 2.0) -> None:
        self.inner, self.name, self.schedule = inner, name, schedule
        self.lost_wait_s = lost_wait_s
        self.where = f"{inner.where} (faults injected)"
        self.lost = inner.lost
        self.crashed = False
        self._oldest: StateBlob | None = None  # the first state offered (STALE_STATE serves it)
        self._stale = False  # a STALE_STATE fired: the next fetch_state serves ``_oldest``

    @property
    def current_round(self) -> int:
        return self.inner.current_round

    def _alive(self) -> None:
        if self.crashed:
            raise NodeCrashed(f"{self.name} crashed")

    def get_run_config(self) -> RunConfig:
        self._alive()
        return self.inner.get_run_config()

    def join(self, identity: Identity) -> JoinInfo:
        self._alive()
        return self.inner.join(identity)

    def exchange(self, submission: Submission, timeout_s: float) -> RoundResult:
        self._alive()
        sub = submission
        faults = self.schedule.take(self.name, sub.round)
        if Fault.CRASH in faults:
            self.crashed = True
            self.inner.close()
            raise NodeCrashed(f"{self.name} crashed at round {sub.round} (injected)")
        self._stale = self._stale or Fault.STALE_STATE in faults
        if Fault.FORGET in faults:
            raise Rejoin(f"the run forgot {self.name} at round {sub.round} (injected)")
        if Fault.LOST_REPLY in faults:
            self.inner.exchange(sub, timeout_s)  # the round closes with our frame; its reply is lost
            raise Rejoin(f"the run forgot {self.name} after round {sub.round} took its frame (injected)")
        if Fault.CORRUPT in faults:
            sub = dataclasses.replace(sub, frame=flip_byte(sub.frame, self.schedule.rng))
        if Fault.DROP in faults:
            result = self.inner.observe(sub.round, min(timeout_s, self.lost_wait_s), sub.fingerprint)
            return dataclasses.replace(result, bytes_sent=len(sub.frame))
        if Fault.DELAY in faults:
            self.inner.observe(sub.round, min(timeout_s, self.lost_wait_s), sub.fingerprint)
            result = self.inner.exchange(sub, timeout_s)  # now late
        else:
            result = self.inner.exchange(sub, timeout_s)
        if Fault.DUPLICATE in faults:
            result = self.inner.exchange(sub, timeout_s)
        if Fault.CORRUPT_RESULT in faults:
            others = sorted(s for s in result.payloads if s != self.name)
            if others:
                victim = others[self.schedule.rng.randrange(len(others))]
                payloads = {**result.payloads, victim: flip_byte(result.payloads[victim], self.schedule.rng)}
                result = dataclasses.replace(result, payloads=payloads)
        return result

    def observe(self, round_: int, timeout_s: float, fingerprint: str = "") -> RoundResult:
        self._alive()
        return self.inner.observe(round_, timeout_s, fingerprint)

    def round_started(self, round_: int) -> bool | None:
        self._alive()
        return self.inner.round_started(round_)

    def fetch_state(self, after_round: int | None, timeout_s: float, at_least: int = 0) -> StateBlob | None:
        self._alive()
        if self._stale and self._oldest is not None:
            self._stale = False
            return self._oldest
        return self.inner.fetch_state(after_round, timeout_s, at_least)

    @property
    def serves_past_results(self) -> bool:
        return bool(getattr(self.inner, "serves_past_results", False))

    def bound_results(self, limits: Any) -> None:
        bound = getattr(self.inner, "bound_results", None)
        if bound is not None:
            bound(limits)

    def offer_state(self, committed: int, fingerprint: str, make_blob: Callable[[], bytes]) -> None:
        if self._oldest is None and committed > 0 and any(i.node == self.name and i.fault is Fault.STALE_STATE
                                                         for i in self.schedule.pending):
            self._oldest = StateBlob(committed, make_blob(), fingerprint)
        if not self.crashed:
            self.inner.offer_state(committed, fingerprint, make_blob)

    def leave(self, reason: str) -> None:
        if not self.crashed:  # a dead node says nothing
            self.inner.leave(reason)

    def close(self) -> None:
        if not self.crashed:
            self.inner.close()
