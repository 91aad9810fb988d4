"""An in-process relay for code that drives every worker from one thread: the simulator and the recipe oracles.

Workers submit their frames for a round, then each collects; the first ``collect`` closes the round with the
frames present (in one thread nobody else will arrive), provided at least ``min_members`` submitted. Bytes are
counted as a relay/all-gather moves them: each worker sends its frame once and receives every other member's.
Workers connected with a public key have it handed to every collector with the round's result
(``RoundResult.member_keys``), so their frames are verified as a coordinator's relay would have them verified.

This is not a control plane (a daemon needs one that waits for the others: node/transport/inprocess_plane.py).
"""
from __future__ import annotations

import threading

from node.transport.messages import RoundResult, RoundStatus


class InProcessHub:
    def __init__(self, min_members: int = 1) -> None:
        self.min_members = min_members
        self._pending: dict[int, dict[str, bytes]] = {}
        self._closed: dict[int, dict[str, bytes] | None] = {}
        self._lock = threading.Lock()
        self.keys: dict[str, bytes] = {}  # name → public key, of the workers connected with one

    def connect(self, name: str, public_key: bytes = b"") -> "RelayLink":
        """``public_key``: the worker's ed25519 key (node/identity.py); b"": it signs nothing."""
        if public_key:
            self.keys[name] = public_key
        return RelayLink(self, name)

    def _close(self, round_: int) -> dict[str, bytes] | None:
        with self._lock:
            if round_ not in self._closed:
                got = self._pending.pop(round_, {})
                self._closed[round_] = dict(sorted(got.items())) if len(got) >= self.min_members else None
            return self._closed[round_]


class RelayLink:
    """One worker's end of the relay."""

    def __init__(self, hub: InProcessHub, name: str) -> None:
        self.hub, self.name = hub, name
        self._submitted: dict[int, int] = {}  # round → bytes this worker put on the wire

    def submit(self, round_: int, payload: bytes) -> None:
        self._submitted[round_] = len(payload)
        with self.hub._lock:
            if round_ in self.hub._closed:
                return  # late: the round closed without us; the caller's feedback keeps the update
            self.hub._pending.setdefault(round_, {})[self.name] = payload

    def collect(self, round_: int) -> RoundResult:
        payloads = self.hub._close(round_)
        sent = self._submitted.pop(round_, 0)
        if payloads is None:
            return RoundResult(round_, RoundStatus.NO_QUORUM, reason=f"fewer than {self.hub.min_members} members "
                               "submitted", bytes_sent=sent)
        received = sum(len(p) for s, p in payloads.items() if s != self.name)
        keys = {s: self.hub.keys[s] for s in payloads if s in self.hub.keys} if self.hub.keys else {}
        return RoundResult(round_, RoundStatus.COMMITTED, payloads, reason="all live members submitted",
                           bytes_sent=sent, bytes_received=received, member_keys=keys)
