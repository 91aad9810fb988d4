"""Domain errors of the coordinator; the servicer maps each to one gRPC status code."""
from __future__ import annotations


class CoordinatorError(Exception):
    """Base: ``code`` names a grpc.StatusCode member; ``metadata`` goes into trailing metadata."""

    code = "INTERNAL"

    def __init__(self, message: str, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.metadata = metadata or {}


class Refused(CoordinatorError):
    """Join refused: incompatible protocol, config, task or model."""
    code = "FAILED_PRECONDITION"


class Unauthorized(CoordinatorError):
    """A missing or wrong credential: join or read token, key signature, timestamp, replay, certificate."""
    code = "UNAUTHENTICATED"


class UnknownNode(CoordinatorError):
    """Node id unknown: never joined, left, or lease expired. The node must join again."""
    code = "NOT_FOUND"


class Conflict(CoordinatorError):
    code = "ALREADY_EXISTS"


class Full(CoordinatorError):
    code = "RESOURCE_EXHAUSTED"


class TooLarge(CoordinatorError):
    code = "RESOURCE_EXHAUSTED"


class BadPayload(CoordinatorError):
    code = "INVALID_ARGUMENT"


class BadSignature(BadPayload):
    """A frame whose signature is missing or does not verify against the key its sender joined with."""


class WrongRound(CoordinatorError):
    """A payload or request for a round that is closed or not yet open."""
    code = "FAILED_PRECONDITION"


class Late(WrongRound):
    """A payload for a round that already closed (the metrics count these apart: ``lowband_frames_late_total``)."""


class ResumeMismatch(CoordinatorError):
    """Upload resumed at the wrong offset; metadata ``lowband-resume-offset`` holds the right one."""
    code = "OUT_OF_RANGE"


class Truncated(CoordinatorError):
    """The upload stream ended before ``total_size`` bytes; resume from the offset in metadata."""
    code = "DATA_LOSS"


class NotSubmitted(CoordinatorError):
    """Collect by a member that owes this round a payload the coordinator does not hold (e.g. after a restart)."""
    code = "FAILED_PRECONDITION"


class StillOpen(CoordinatorError):
    code = "DEADLINE_EXCEEDED"


class ResultGone(CoordinatorError):
    """The round's result is no longer held: fetch state instead."""
    code = "OUT_OF_RANGE"


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
