"""A round's accountability report: what the bounds and the robust reduce did to each member's frame, as data.

The reduce returns it with the aggregate (``Aggregate.report``); the node writes it into its ``rounds.jsonl``
(``"robust"``), the coordinator folds it into each member's record and its Status. Every replica computes the same
report from the same frames.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class MemberReport:
    """One member's frame in one round.

    ``norm``: ‖payload‖₂ as sent, all tensors (fp64, quantized per tensor); ``norm_ratio``: norm / ‖reference‖ (the
    reference norms of every tensor, ``bounds.decide``; NaN when the reference is 0); ``cosine``: cosine between the
    payload as sent and the round's aggregate, both decoded, fp64 (None when either is 0 or the frame was not
    considered); ``clipped``: tensors clipped; ``factor``: the smallest clip factor (1.0: none); ``rejected``: "" or
    why its frame was dropped (bounds, or eviction)."""

    name: str
    norm: float
    norm_ratio: float
    cosine: float | None
    clipped: int = 0
    factor: float = 1.0
    rejected: str = ""

    @property
    def flagged(self) -> bool:
        return self.clipped > 0 or bool(self.rejected)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"norm_ratio": _num(self.norm_ratio), "cosine": _num(self.cosine)}
        if self.clipped:
            d |= {"clipped": self.clipped, "factor": _num(self.factor)}
        if self.rejected:
            d["rejected"] = self.rejected
        return d


def _num(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, digits)


@dataclass(frozen=True)
class RoundReport:
    """``members``: every frame the round's validated set held, by sender name (sorted); ``kept``: the senders whose
    payloads entered the aggregate; ``factors``: per kept sender, per tensor (model order), the factor its payload
    was scaled by; ``evicted``: members evicted by this round (name → reason; their frames are dropped from the next
    round on); ``reference_norm``: ‖(ref_t)_t‖₂."""

    round: int
    reference_norm: float
    members: Mapping[str, MemberReport] = field(default_factory=dict)
    kept: tuple[str, ...] = ()
    factors: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    evicted: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``"robust"`` entry of a rounds.jsonl line."""
        d: dict[str, Any] = {"reference_norm": _num(self.reference_norm, 6),
                             "members": {n: m.to_json() for n, m in sorted(self.members.items())}}
        if self.evicted:
            d["evicted"] = dict(self.evicted)
        return d

    @property
    def flagged(self) -> list[str]:
        """Members whose frame was clipped or rejected this round."""
        return [n for n, m in sorted(self.members.items()) if m.flagged]
