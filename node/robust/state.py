"""What bounds and accountability remember between rounds: part of the run's state, identical on every replica.

``RobustState`` holds the history of each tensor's reference norm (``bounds.py``) and a ``MemberRecord`` per member
that ever sent a frame: counts of its frames, of those clipped and rejected, the flags of its last
``reduce.evict_window`` frames and, once it crossed ``reduce.evict_after``, when and why it was evicted. Decisions
read only integers and the history, which every replica computes alike from the same frames; ``norm_ratio`` and
``cosine`` are the latest values, for people (Status, logs).

In the state file (docs/state.md): the tensor ``robust/history`` (F64, one value per trainable tensor, model order)
and the header's ``"robust"`` object ``{"members": {name: {...record...}}}`` — present exactly when the recipe's
``[reduce]`` is not the default.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from node.config import ReduceConfig

MAX_MEMBERS = 1 << 16
MAX_REASON = 2048
HISTORY_KEY = "robust/history"


class RobustStateError(ValueError):
    """A state's robust section is malformed (the message names the field)."""


@dataclass(frozen=True)
class MemberRecord:
    frames: int = 0  # frames considered (not counting those dropped after eviction)
    clipped: int = 0  # of those, frames with at least one tensor clipped
    rejected: int = 0  # of those, frames the bounds rejected
    flags: int = 0  # bit k: the k-th most recent frame was clipped or rejected (reduce.evict_window bits)
    evicted_at: int = -1  # the round it was evicted in (−1: never)
    reason: str = ""  # why it was evicted
    norm_ratio: float | None = None  # latest ‖frame‖ / ‖reference‖ (for people)
    cosine: float | None = None  # latest cosine of its payload to the round's aggregate (for people)

    @property
    def evicted(self) -> bool:
        return self.evicted_at >= 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, name: str, d: Any) -> "MemberRecord":
        if not isinstance(d, dict) or set(d) != {f.name for f in dataclasses.fields(cls)}:
            raise RobustStateError(f"robust member {name!r}: expected the fields of a member record")
        for key in ("frames", "clipped", "rejected", "flags"):
            if type(d[key]) is not int or not 0 <= d[key] < 1 << 64:
                raise RobustStateError(f"robust member {name!r}: {key} {d[key]!r} is not a non-negative integer")
        if type(d["evicted_at"]) is not int or not -1 <= d["evicted_at"] < 1 << 53:
            raise RobustStateError(f"robust member {name!r}: evicted_at {d['evicted_at']!r} is not a round or −1")
        if not isinstance(d["reason"], str) or len(d["reason"]) > MAX_REASON:
            raise RobustStateError(f"robust member {name!r}: reason is not a string of at most {MAX_REASON} characters")
        for key in ("norm_ratio", "cosine"):
            v = d[key]
            if v is not None and (type(v) not in (int, float) or not math.isfinite(v)):
                raise RobustStateError(f"robust member {name!r}: {key} {v!r} is not a finite number or null")
        return cls(**d)


@dataclass(frozen=True)
class RobustState:
    """``history``: h_t per trainable tensor (0.0: none yet); ``members``: name → record."""

    history: tuple[float, ...]
    members: Mapping[str, MemberRecord] = field(default_factory=dict)

    @classmethod
    def fresh(cls, tensors: int) -> "RobustState":
        return cls((0.0,) * tensors, {})

    def evicted(self, name: str) -> MemberRecord | None:
        record = self.members.get(name)
        return record if record is not None and record.evicted else None

    # -- the state file -----------------------------------------------------------------------------------------
    def header(self) -> dict[str, Any]:
        return {"members": {name: r.to_json() for name, r in sorted(self.members.items())}}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {HISTORY_KEY: torch.tensor(self.history, dtype=torch.float64)}

    @classmethod
    def from_state(cls, header: Any, history: torch.Tensor, tensors: int) -> "RobustState":
        """From a state file's ``"robust"`` header object and its ``robust/history`` tensor (already checked to be
        F64 of shape (tensors,) and finite). Raises RobustStateError."""
        if not isinstance(header, dict) or set(header) != {"members"} or not isinstance(header["members"], dict):
            raise RobustStateError("state's 'robust' section must be {\"members\": {...}}")
        members = header["members"]
        if len(members) > MAX_MEMBERS:
            raise RobustStateError(f"state's robust section lists {len(members)} members, more than {MAX_MEMBERS}")
        records = {}
        for name, d in members.items():
            if not isinstance(name, str) or not 0 < len(name) <= 256:
                raise RobustStateError(f"robust member name {name!r} is not 1–256 characters")
            records[name] = MemberRecord.from_json(name, d)
        values = tuple(float(v) for v in history.tolist())
        if len(values) != tensors or any(v < 0 for v in values):
            raise RobustStateError(f"{HISTORY_KEY} must hold {tensors} non-negative norms")
        return cls(values, records)


def record_frame(record: MemberRecord, round_: int, flagged: bool, clipped: bool, rejected: bool,
                 norm_ratio: float | None, cosine: float | None, cfg: ReduceConfig) -> MemberRecord:
    """The record after one more frame of this member; evicted when ``cfg.evict_after`` > 0 and at least that many
    of its last ``cfg.evict_window`` frames were flagged (clipped or rejected). Pure: integers decide."""
    flags = ((record.flags << 1) | int(flagged)) & ((1 << cfg.evict_window) - 1)
    evicted_at, reason = record.evicted_at, record.reason
    count = bin(flags).count("1")
    if not record.evicted and cfg.evict_after and count >= cfg.evict_after:
        evicted_at = round_
        reason = (f"{count} of its last {min(record.frames + 1, cfg.evict_window)} frames were clipped or rejected "
                  f"(reduce.evict_after {cfg.evict_after} of {cfg.evict_window})")
    return MemberRecord(record.frames + 1, record.clipped + int(clipped), record.rejected + int(rejected), flags,
                        evicted_at, reason, norm_ratio, cosine)
