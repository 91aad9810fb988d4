"""A round's outer step, split around the commit point, and the same step when a round is replayed.

``prepare_round`` reads the live reference but changes nothing: it decodes the round's frames, reduces them and, in
aggregate mode, encodes the aggregate every member will receive. The caller then makes the round durable (its
write-ahead record and row, coordinator/store.py) and only then calls ``apply_prepared``, which takes the outer step
in place — so a failed write leaves the live state exactly as it was, retrying computes the same step again from
the same state, and the step is never applied twice. A restart replays a logged round with the same two calls on
the same frames (coordinator/replay.py): the reduce and the outer step are deterministic, so the state is
bit-identical to the one the round's row fingerprinted.

``Persistence`` remembers that the store is failing (the reason, for health checks, Status and the refusals of
round calls) and paces the retries (``retry_s`` doubling up to ``max_retry_s`` seconds of the core's clock).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from node import wire
from node.errors import PayloadError
from node.keyring import KeyRing
from node.runfile import RunFile
from coordinator.accumulate import RunningReduce
from node.train.reference import Aggregate, Reference

log = logging.getLogger(__name__)


def applied_as(cfg: RunFile) -> dict[str, Any]:
    """How this run applies a round, as its write-ahead record notes it (a replay applies it the same way)."""
    if cfg.result == "aggregate":
        return {"result": "aggregate", "codec": cfg.aggregate_codec}
    if cfg.result == "compressed":  # the run's codec with the downlink residual (node/train/downlink.py)
        return {"result": "compressed"}
    return {"result": "relay"}


@dataclass
class Prepared:
    """A round ready to apply: ``aggregate`` the fp32 tensors (model order) the outer step takes as .grad, with the
    round's buffers, report and robust state; ``frame`` the aggregate frame members receive (aggregate and compressed
    modes); ``downlink`` the compressed downlink's next residual (compressed mode: it replaces the reference's at the
    step, so preparing changes nothing)."""

    round: int
    aggregate: Sequence[torch.Tensor] | None  # None: reduced tensor by tensor as it is stepped (``envelopes``)
    frame: bytes | None
    applied: dict[str, Any]
    envelopes: list[wire.Envelope] | None = None  # the decoded frames, when the step reduces as it goes
    downlink: list[torch.Tensor] | None = None


def prepare_round(reference: Reference, frames: dict[str, bytes], round_: int, applied: dict[str, Any],
                  keys: KeyRing | None = None) -> Prepared:
    """Decode and reduce round ``round_``'s frames (sender → frame, signed by ``keys`` when given) on ``reference``
    without changing it. Relay mode: the codec's (or robust) reduce, which every member computes alike. Aggregate
    mode: that reduce encoded with ``applied["codec"]``; the step applies what the frame decodes to (what the members
    will apply). Compressed mode: that reduce encoded with the run's codec and a copy of the downlink residual
    (node/train/downlink.py); the step applies what the frame decodes to and takes the new residual. Raises
    PayloadError when a frame does not validate (frames are validated on arrival: at a commit this is a bug; in a
    replay, a record that is not what was committed) or a compressed round meets a reference without a residual.
    ``applied["order"]``: the round was reduced frame by frame as they were accepted (accumulate.py): the frames are
    added in that order again."""
    envelopes, rejected = reference.unpack(frames, round_, keys)
    if rejected or not envelopes:
        raise PayloadError(f"round {round_}: frames that do not validate: {rejected or 'none given'}")
    order = applied.get("order")
    if order is not None:  # reduced frame by frame in the order they were accepted (coordinator/accumulate.py)
        by_sender = {e.sender: e for e in envelopes}
        if (not isinstance(order, list) or not all(isinstance(s, str) for s in order)
                or sorted(order) != sorted(by_sender)):
            raise PayloadError(f"round {round_}: the recorded order {order!r} does not list its frames' senders")
        running = RunningReduce(reference)
        for sender in order:
            running.add(by_sender[sender])
        return prepare_reduced(reference, running.aggregate(), round_, applied)
    if applied.get("result") not in ("aggregate", "compressed") and reference.steps_tensor_by_tensor:
        # reduced tensor by tensor inside the step: a whole model's fp32 aggregate never exists at once
        return Prepared(round_, None, None, applied, envelopes)
    return prepare_reduced(reference, reference.reduce(envelopes), round_, applied)


def prepare_reduced(reference: Reference, reduced: Aggregate, round_: int, applied: dict[str, Any]) -> Prepared:
    """``prepare_round`` from the round's reduce (``reduced``, computed at the close or frame by frame): the frame
    members receive, encoded as ``applied`` says, and what the step takes. Changes nothing on ``reference``. Raises
    PayloadError for a compressed round on a reference without a downlink residual."""
    if applied.get("result") == "compressed":
        if reference.downlink is None:
            raise PayloadError(f"round {round_} was applied with a compressed downlink, and this reference keeps no "
                               "downlink residual")
        residual = [e.clone() for e in reference.downlink]  # the live residual stays as it is until the step
        frame, decoded = reference.pack_compressed(reduced, round_, residual)
        return Prepared(round_, decoded, frame, applied, downlink=residual)
    if applied.get("result") == "aggregate":
        frame, decoded = reference.pack_aggregate(reduced, round_, str(applied.get("codec", "identity")))
        return Prepared(round_, decoded, frame, applied)
    return Prepared(round_, reduced, None, applied)


def apply_prepared(reference: Reference, prepared: Prepared) -> None:
    """The outer step of the prepared round, in place on ``reference`` (θ_ref, buffers, outer and robust state).
    Where the outer optimizer steps each parameter alone, each tensor is reduced just before it is stepped
    (``Reference.step_each``): the same arithmetic in the same order as reducing everything first, bit for bit."""
    if prepared.envelopes is not None:
        envelopes = prepared.envelopes
        reference.step_each(lambda i: reference.reduce_one(envelopes, i), reference.reduce_buffers(envelopes),
                            prepared.round)
        return
    assert prepared.aggregate is not None
    reference.step(prepared.aggregate, prepared.round)
    if prepared.downlink is not None:
        reference.downlink = prepared.downlink  # replaced, not written into: a snapshot may still be reading the old


def held_frames(frames: dict[str, bytes], aggregate: bytes | None) -> dict[str, bytes]:
    """What a committed result keeps of its frames in memory: all of them in relay mode (collectors get them); with an
    aggregate only the senders' names, each with b"" (collectors get the aggregate; the write-ahead record keeps the
    frames, and a replay reads them there)."""
    return frames if aggregate is None else dict.fromkeys(frames, b"")


class Persistence:
    """Whether the coordinator can persist, and when to try again after it could not."""

    def __init__(self, retry_s: float = 0.5, max_retry_s: float = 10.0) -> None:
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self.error = ""  # why the last write failed; "" while writes succeed
        self.retry_at = 0.0
        self._backoff = retry_s
        self.failures = 0

    @property
    def ok(self) -> bool:
        return not self.error

    def may_try(self, now: float) -> bool:
        return not self.error or now >= self.retry_at

    def failed(self, now: float, what: str, exc: BaseException) -> None:
        first = not self.error
        self.error = f"cannot persist {what}: {type(exc).__name__}: {exc}"
        self.failures += 1
        self.retry_at = now + self._backoff
        if first or self.failures % 20 == 0:
            log.error("%s; not serving rounds until the state dir is writable again (retrying every ≤ %.0f s, "
                      "%d failures so far)", self.error, self.max_retry_s, self.failures)
        self._backoff = min(self.max_retry_s, self._backoff * 2)

    def succeeded(self) -> None:
        if self.error:
            log.warning("persisting works again after %d failures: serving rounds", self.failures)
        self.error, self.failures, self._backoff = "", 0, self.retry_s
