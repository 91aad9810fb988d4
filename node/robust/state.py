"""What bounds and accountability remember between rounds: part of the run's state, identical on every replica.

``RobustState`` holds the history of each tensor's reference norm (``bounds.py``) and a ``MemberRecord`` per member
that ever sent a frame: counts of its frames, of those clipped and rejected, the flags of its last
``reduce.evict_window`` frames, the last round it sent one and, once it crossed ``reduce.evict_after``, when and why
it was evicted. Decisions read only integers and the history, which every replica computes alike from the same
frames; ``norm_ratio`` and ``cosine`` are the latest values, for people (Status, logs).

The records are bounded where they are made (``prune``, after every round, alike on every replica): a member that
joins under fresh names each round would otherwise grow them until the state is too large to load (the reader
refuses more than ``MAX_MEMBERS``, and a state file's header is bounded). A record not evicted is forgotten once its
member sent nothing for ``RECORD_TTL_ROUNDS`` rounds (what it loses: the flags of its last frames); at most
``MAX_EVICTED`` evicted records are kept, those whose member sent a frame most recently (an evicted member that keeps
sending stays evicted; the coordinator also refuses an evicted key at Join for good, coordinator/names.py); at most
``MAX_RECORDS`` records in all, the least recently seen forgotten first.

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

MAX_MEMBERS = 1 << 16  # what the reader accepts (a state written before records were pruned may list more)
MAX_REASON = 2048
RECORD_TTL_ROUNDS = 1024
MAX_EVICTED = 1024
MAX_RECORDS = 4096  # what the writer keeps: ≤ MAX_MEMBERS, and MAX_RECORDS × RECORD_HEADER_BYTES fits a header
#: a record's share of a state file's header at most: a 256-character name of 4-byte characters, escaped twice
#: (\\uXXXX per surrogate: the header is JSON inside safetensors' JSON metadata), takes 3,584 bytes; its fields ~360
RECORD_HEADER_BYTES = 4096
HEADER_BYTES = MAX_RECORDS * RECORD_HEADER_BYTES  # what the records add to a state file's header at most
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
    last_round: int = -1  # the last round it sent a frame in, considered or dropped (what pruning goes by)

    @property
    def evicted(self) -> bool:
        return self.evicted_at >= 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, name: str, d: Any, committed: int = 0) -> "MemberRecord":
        """``committed``: the state's committed rounds; a record written before ``last_round`` existed is taken as
        seen in the state's last round (every replica loading that state decides alike)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        if isinstance(d, dict) and set(d) == fields - {"last_round"}:
            d = {**d, "last_round": max(committed - 1, d["evicted_at"] if type(d["evicted_at"]) is int else -1)}
        if not isinstance(d, dict) or set(d) != fields:
            raise RobustStateError(f"robust member {name!r}: expected the fields of a member record")
        if type(d["last_round"]) is not int or not -1 <= d["last_round"] < 1 << 53:
            raise RobustStateError(f"robust member {name!r}: last_round {d['last_round']!r} is not a round or −1")
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

    def pruned(self, round_: int) -> "RobustState":
        """This state with its records bounded after round ``round_`` (module doc): a pure function of the records
        and the round, so every replica forgets the same ones. Ties go by name."""
        stale = round_ - RECORD_TTL_ROUNDS
        evicted = sorted((n for n, r in self.members.items() if r.evicted),
                         key=lambda n: (-self.members[n].last_round, -self.members[n].evicted_at, n))
        kept = evicted[:MAX_EVICTED]
        live = sorted((n for n, r in self.members.items() if not r.evicted and r.last_round >= stale),
                      key=lambda n: (-self.members[n].last_round, n))
        kept += live[:MAX_RECORDS - len(kept)]
        if len(kept) == len(self.members):
            return self
        return RobustState(self.history, {n: self.members[n] for n in sorted(kept)})

    @classmethod
    def from_state(cls, header: Any, history: torch.Tensor, tensors: int, committed: int = 0) -> "RobustState":
        """From a state file's ``"robust"`` header object and its ``robust/history`` tensor (already checked to be
        F64 of shape (tensors,) and finite); ``committed``: the state's committed rounds (see
        ``MemberRecord.from_json``). Raises RobustStateError."""
        if not isinstance(header, dict) or set(header) != {"members"} or not isinstance(header["members"], dict):
            raise RobustStateError("state's 'robust' section must be {\"members\": {...}}")
        members = header["members"]
        if len(members) > MAX_MEMBERS:
            raise RobustStateError(f"state's robust section lists {len(members)} members, more than {MAX_MEMBERS}")
        records = {}
        for name, d in members.items():
            if not isinstance(name, str) or not 0 < len(name) <= 256:
                raise RobustStateError(f"robust member name {name!r} is not 1–256 characters")
            records[name] = MemberRecord.from_json(name, d, committed)
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
                        evicted_at, reason, norm_ratio, cosine, round_)
