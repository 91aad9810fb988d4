"""What crosses the control-plane seam (node/transport/control.py), as typed values: a node's submission for a round,
the round's result with why it ended as it did, and the run's state for a joiner.

Decisions travel as data: ``RoundResult.status`` says what happened (the daemon branches on it), ``reason`` says it
to people (logs, the audit trail) and is never parsed.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Submission:
    """This node's contribution to a round.

    ``frame``: the wire frame (node/wire.py) carrying the encoded pseudo-gradient; ``sender``: the node's name, as
    the frame names it; ``loss``: mean training loss of the round's inner steps (NaN: not measured);
    ``fingerprint``: this replica's reference θ_ref *before* the round (16 hex chars, ``Reference.fingerprint``),
    so planes that compare replicas can keep a diverged one out."""

    round: int
    frame: bytes
    sender: str
    loss: float = math.nan
    fingerprint: str = ""


class RoundStatus(str, enum.Enum):
    """How a round ended for this node."""

    COMMITTED = "committed"  # the round committed: ``payloads`` (or ``aggregate``) is its result
    TIMED_OUT = "timed_out"  # it did not close within the caller's bound
    NO_QUORUM = "no_quorum"  # fewer members than the run's quorum agreed on a result
    UNDECIDED = "undecided"  # no member published an outcome in time (serverless)
    MALFORMED = "malformed"  # the result arrived incomplete or out of order
    CLOSED = "closed"  # the control plane is closed
    DIVERGED = "diverged"  # this replica's reference is not the run's: fetch the state
    RESULT_GONE = "result_gone"  # the round's result can no longer be had: fetch the state
    FRAMES_UNAVAILABLE = "frames_unavailable"  # the members agreed on frames this node cannot get: fetch the state


#: the outcomes after which the node must adopt the run's state before it can go on
STATE_NEEDED = frozenset({RoundStatus.DIVERGED, RoundStatus.RESULT_GONE, RoundStatus.FRAMES_UNAVAILABLE})


@dataclass(frozen=True)
class RoundResult:
    round: int
    status: RoundStatus
    #: sender → frame, for every member whose payload made it into the round (sorted by sender)
    payloads: dict[str, bytes] = field(default_factory=dict)
    reason: str = ""  # for people: logs and the audit trail
    bytes_sent: int = 0  # this node's bytes on the wire for the round (its upload, or what it served)
    bytes_received: int = 0
    #: digest of the reference after this round, where the plane knows one (coordinator mode)
    reference_fingerprint: str = ""
    #: coordinator-side reduce: one dense frame (codec ``aggregate_codec``) instead of every payload,
    #: and the members whose payloads it combines
    aggregate: bytes | None = None
    aggregate_codec: str = ""
    aggregate_members: tuple[str, ...] = ()
    #: sender → the 32-byte ed25519 public key the run registered for it, for every sender in ``payloads``: the node
    #: verifies each frame's signature against it (node/keyring.py). Empty where the plane knows no keys: nothing is
    #: verified then (every replica of a round must get the same keys, or none)
    member_keys: dict[str, bytes] = field(default_factory=dict)

    @property
    def committed(self) -> bool:
        return self.status is RoundStatus.COMMITTED

    @property
    def state_needed(self) -> bool:
        """The node must fetch the run's state: its replica diverged, or the round's result is gone."""
        return self.status in STATE_NEEDED

    @property
    def members(self) -> tuple[str, ...]:
        """The senders whose payloads the result combines (relay or aggregate)."""
        return tuple(sorted(self.payloads)) if self.aggregate is None else tuple(self.aggregate_members)


@dataclass(frozen=True)
class StateBlob:
    """The run's state for a joiner: ``committed`` rounds applied, the serialised ``Reference`` state
    (``Reference.to_bytes``) and the fingerprint of its θ_ref."""

    committed: int
    blob: bytes
    fingerprint: str
