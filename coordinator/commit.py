"""An idempotent commit: the round's outer step is computed on a scratch copy of the reference, the new state is
persisted, and only then is it swapped in. A failed write leaves the live state exactly as it was, so retrying the
commit computes the same step again from the same state — it is never applied twice.

``Persistence`` remembers that the store is failing (the reason, for health checks, Status and the refusals of
round calls) and paces the retries (``retry_s`` doubling up to ``max_retry_s`` seconds of the core's clock).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from node.keyring import KeyRing
from node.runfile import RunFile
from node.train.reference import Reference

log = logging.getLogger(__name__)


@dataclass
class Step:
    """A round's outcome computed off the live state: ``reference`` holds the new state."""

    reference: Reference
    blob: bytes
    fingerprint: str
    aggregate: bytes | None


def copy_state(src: Reference, dst: Reference) -> None:
    """``dst`` ← ``src`` in memory: parameters, buffers, the outer optimizer's state (deep-copied: nothing is shared)
    and the committed-round count. Both were built for the same run and model (the same tensors in the same order)."""
    with torch.no_grad():
        for d, s in zip(dst.tensors, src.tensors, strict=True):
            d.copy_(s)
        for d, s in zip(dst.buffers, src.buffers, strict=True):
            d.copy_(s)
    dst.outer.load_state_dict(copy.deepcopy(src.outer.state_dict()))
    dst.committed_rounds = src.committed_rounds
    if dst.downlink is not None:  # the compressed downlink's residual (result = "compressed")
        with torch.no_grad():
            for d, s in zip(dst.downlink, src.downlink, strict=True):
                d.copy_(s)
    dst.robust, dst.last_report = src.robust, src.last_report  # immutable values (node/robust/state.py): shared


def compute_step(live: Reference, scratch: Reference, frames: dict[str, bytes], round_: int, cfg: RunFile,
                 keys: KeyRing | None = None) -> Step:
    """Copy ``live``'s state into ``scratch`` and apply round ``round_`` (``frames``: sender → validated frame, signed
    by the keys in ``keys`` when given) there; ``live`` is not touched. Relay mode applies every frame; aggregate mode
    reduces, encodes the aggregate with ``cfg.aggregate_codec`` and applies what it decodes to (what the members will
    apply); compressed mode does the same with the run's codec and the downlink residual (node/train/downlink.py),
    which advances on the scratch copy only."""
    copy_state(live, scratch)
    envelopes, rejected = scratch.unpack(frames, round_, keys)
    assert not rejected, f"frames were validated on arrival: {rejected}"
    aggregate = None
    if cfg.result != "relay":
        aggregate = scratch.apply_aggregate(envelopes, round_, None if cfg.compressed_downlink else cfg.aggregate_codec)
    else:
        scratch.apply(envelopes, round_)
    return Step(scratch, scratch.to_bytes(), scratch.fingerprint(), aggregate)


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
