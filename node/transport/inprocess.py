"""In-process transport: N workers in one process share a hub. Used by the simulator and tests.

A round closes as soon as every live member submitted. ``collect`` on a round that is still missing
payloads closes it with the ones present (in one process nobody else will arrive), provided at least
``min_members`` submitted. Bytes are counted as a relay/all-gather would move them: each worker sends
its frame once and receives every other member's frame.
"""
from __future__ import annotations

import threading
from typing import Callable

from node.transport.base import Membership, RoundResult, State, Transport


class InProcessHub:
    def __init__(self, min_members: int = 1) -> None:
        self.min_members = min_members
        self.members: list[str] = []
        self._pending: dict[int, dict[str, bytes]] = {}
        self._closed: dict[int, dict[str, bytes] | None] = {}
        self.state: State | None = None  # the newest state a worker offered (for joiners)
        self._lock = threading.Lock()
        self._state_offered = threading.Condition(self._lock)

    def connect(self, name: str) -> "InProcessTransport":
        return InProcessTransport(self, name)

    def _close(self, round_: int) -> dict[str, bytes] | None:
        with self._lock:
            if round_ not in self._closed:
                got = self._pending.pop(round_, {})
                self._closed[round_] = dict(sorted(got.items())) if len(got) >= self.min_members else None
            return self._closed[round_]


class InProcessTransport(Transport):
    def __init__(self, hub: InProcessHub, name: str) -> None:
        self.hub, self.name = hub, name
        self._submitted: dict[int, int] = {}  # round → bytes this node put on the wire

    def join(self) -> Membership:
        with self.hub._lock:
            if self.name not in self.hub.members:
                self.hub.members.append(self.name)
            next_round = max(self.hub._closed, default=-1) + 1
            return Membership(self.name, tuple(self.hub.members), next_round)

    def submit(self, round_: int, payload: bytes) -> None:
        self._submitted[round_] = len(payload)
        with self.hub._lock:
            if round_ in self.hub._closed:
                return  # late: the round closed without us; the caller's feedback keeps the update
            self.hub._pending.setdefault(round_, {})[self.name] = payload

    def collect(self, round_: int, timeout_s: float = 0.0) -> RoundResult:
        payloads = self.hub._close(round_)
        sent = self._submitted.pop(round_, 0)
        if payloads is None:
            return RoundResult(round_, False, reason=f"fewer than {self.hub.min_members} members submitted",
                               bytes_sent=sent)
        received = sum(len(p) for s, p in payloads.items() if s != self.name)
        return RoundResult(round_, True, payloads, reason="all live members submitted",
                           bytes_sent=sent, bytes_received=received)

    def offer_state(self, committed: int, fingerprint: str, make_blob: Callable[[], bytes]) -> bool:
        with self.hub._lock:
            if self.hub.state is not None and self.hub.state[0] >= committed:
                return False  # another replica already offered this round's state
            self.hub.state = (committed, make_blob(), fingerprint)
            self.hub._state_offered.notify_all()
            return True

    def fetch_state(self, timeout_s: float = 60.0) -> State | None:
        with self.hub._state_offered:
            self.hub._state_offered.wait_for(lambda: self.hub.state is not None, timeout=timeout_s)
            return self.hub.state

    def leave(self) -> None:
        with self.hub._lock:
            if self.name in self.hub.members:
                self.hub.members.remove(self.name)
