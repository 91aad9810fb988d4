"""The transport seam: moves opaque payload bytes between workers and decides whether a round commits.

A transport knows nothing of codecs or tensors. ``submit`` hands over this worker's frame for a round;
``collect`` waits (up to a deadline) for the round to close and returns every committed member's frame,
sorted by sender so that every replica reduces the same payloads in the same order. Splitting submit
from collect lets a node train the next round while an exchange is in flight. Retries, deadlines and
heartbeats live only in transports.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

#: (committed rounds, state blob, reference fingerprint): what a joiner adopts
State = tuple[int, bytes, str]


@dataclass(frozen=True)
class Membership:
    node_id: str
    members: tuple[str, ...]
    round: int  # the first round this node may contribute to


@dataclass(frozen=True)
class RoundResult:
    round: int
    committed: bool
    #: sender → frame, for every member whose payload made it into the round (sorted by sender)
    payloads: dict[str, bytes] = field(default_factory=dict)
    reason: str = ""
    bytes_sent: int = 0
    bytes_received: int = 0
    #: digest of the reference after this round, where the transport knows one (coordinator mode)
    reference_fingerprint: str = ""
    #: the round's result can no longer be had: the node must fetch the global state instead
    state_needed: bool = False
    #: coordinator-side reduce: one dense frame (codec ``aggregate_codec``) instead of every payload,
    #: and the members whose payloads it combines
    aggregate: bytes | None = None
    aggregate_codec: str = ""
    aggregate_members: tuple[str, ...] = ()

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(sorted(self.payloads))


class Transport(ABC):
    @abstractmethod
    def join(self) -> Membership:
        """Enter the run; returns this node's id and the round it contributes to first."""

    @abstractmethod
    def submit(self, round_: int, payload: bytes) -> None:
        """Offer this node's frame for ``round_``; never raises on network faults (the round just won't have it)."""

    @abstractmethod
    def collect(self, round_: int, timeout_s: float) -> RoundResult:
        """Block until ``round_`` closes or ``timeout_s`` passes; an uncommitted result on timeout."""

    def exchange(self, round_: int, payload: bytes, timeout_s: float) -> RoundResult:
        self.submit(round_, payload)
        return self.collect(round_, timeout_s)

    def fetch_state(self, timeout_s: float = 60.0) -> State | None:
        """The run's current global state for a joiner, or None if none can be had within ``timeout_s``."""
        return None

    def offer_state(self, committed: int, fingerprint: str, make_blob: Callable[[], bytes]) -> bool:
        """After applying a round: make this replica's state available to joiners, where peers serve it. Returns
        whether a snapshot was taken (``make_blob`` is called only then). A no-op where a server holds the state."""
        return False

    @abstractmethod
    def leave(self) -> None:
        """Leave the run (immediately, not by lease expiry)."""
