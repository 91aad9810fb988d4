"""Domain errors of the coordinator; the servicer maps each to one gRPC status code.

One code means one thing across the whole service (the table of every RPC's codes is in
proto/lowband/v1/coordinator.proto): INVALID_ARGUMENT is malformed input, FAILED_PRECONDITION a request that is well
formed but does not fit the run's state (incompatible node, round not open, result not held), OUT_OF_RANGE a byte
offset outside what the coordinator holds, and so on. A client decides by the code alone; metadata only adds a value
(the offset to resume from).
"""
from __future__ import annotations


class CoordinatorError(Exception):
    """Base: ``code`` names a grpc.StatusCode member; ``metadata`` goes into trailing metadata."""

    code = "INTERNAL"

    def __init__(self, message: str, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.metadata = metadata or {}


class Refused(CoordinatorError):
    """Incompatible caller: its protocol version, config, config hash, task or model differ from the run's."""
    code = "FAILED_PRECONDITION"


class Evicted(CoordinatorError):
    """Join by a name or key the run evicted ([recipe.reduce] evict_after): it may not join again."""
    code = "PERMISSION_DENIED"


class Unauthorized(CoordinatorError):
    """A missing or wrong credential: join or read token, key signature, timestamp, replay, certificate."""
    code = "UNAUTHENTICATED"


class UnknownNode(CoordinatorError):
    """Node id unknown: never joined, left, or lease expired. The node must join again."""
    code = "NOT_FOUND"


class Conflict(CoordinatorError):
    """A name bound to another key (Join: the first key that joined under it, coordinator/names.py); another payload
    already accepted for this round (Submit)."""
    code = "ALREADY_EXISTS"


class Full(CoordinatorError):
    """The run has max_nodes live members (no ``lowband-retry`` metadata: retrying at once will not help)."""
    code = "RESOURCE_EXHAUSTED"


class TooLarge(CoordinatorError):
    """A payload or chunk larger than any honest frame for this model: malformed input, like ``BadPayload``."""
    code = "INVALID_ARGUMENT"


class BadPayload(CoordinatorError):
    """An upload that is not a valid frame for this run (stream shape, sizes, envelope, signature)."""
    code = "INVALID_ARGUMENT"


class BadSignature(BadPayload):
    """A frame whose signature is missing or does not verify against the key its sender joined with."""


class WrongRound(CoordinatorError):
    """A payload or request for a round that is closed or not yet open."""
    code = "FAILED_PRECONDITION"


class Late(WrongRound):
    """A payload for a round that already closed (the metrics count these apart: ``lowband_frames_late_total``)."""


class ResumeMismatch(CoordinatorError):
    """A byte offset outside what the coordinator holds: an upload resumed at the wrong offset (metadata
    ``lowband-resume-offset`` holds the right one), or a state download from past the end of the state."""
    code = "OUT_OF_RANGE"


class Truncated(CoordinatorError):
    """The upload stream ended before ``total_size`` bytes; resume from the offset in metadata."""
    code = "DATA_LOSS"


class NotSubmitted(CoordinatorError):
    """Collect by a member that owes this round a payload the coordinator does not hold (e.g. after a restart):
    ABORTED, the member redoes the sequence (submit again, then collect)."""
    code = "ABORTED"


class StillOpen(CoordinatorError):
    """Collect: the round did not close within wait_ms; ask again."""
    code = "DEADLINE_EXCEEDED"


class ResultGone(CoordinatorError):
    """Collect of a round whose result the coordinator cannot give (no longer held, or not open yet): the caller is
    out of step with the run and fetches the state instead. The same code as ``WrongRound``: a round-state
    precondition."""
    code = "FAILED_PRECONDITION"


class Invalid(CoordinatorError):
    """A field from the network is out of its bounds (size, charset, depth): the message names field and bound."""
    code = "INVALID_ARGUMENT"


class Busy(CoordinatorError):
    """Too many calls in progress (from one address, one member, or in all)."""
    code = "RESOURCE_EXHAUSTED"


class Unavailable(CoordinatorError):
    """The coordinator cannot take rounds now (it cannot persist them); the message says why."""
    code = "UNAVAILABLE"


class Cancelled(CoordinatorError):
    """The caller went away (or the server cancelled the call): nothing is sent back."""
    code = "CANCELLED"


class StartupError(Exception):
    """The coordinator cannot start (state dir in use or unusable, port busy, unsafe exposure): one line, exit 2."""
