"""Per-sender bounds: how far one frame may pull a round, decided from the round's frames and replicated history.

Every replica runs this on the same norms (sorted by sender) with the same history, in Python floats (IEEE double),
so every replica takes the same decisions. The norms themselves are fp64 sums computed by torch, whose last bits can
depend on the thread count or vector width; ``quantize`` rounds them to 12 significant bits first, so replicas on
different machines agree unless a norm falls within ~1e-12 (relative) of a rounding boundary.

The rule, per tensor t (docs/algorithms.md §11):

    ref_t = median_i n_it                                   (even count: the mean of the two middle norms)
    ref_t = min(ref_t, history_ratio · h_t)                 when a history h_t > 0 exists
    n_it > absurd_ratio · ref_t (ref_t > 0)  → the frame is rejected (absurd), whatever the policy
    n_it > bound_ratio · ref_t               → clip: factor τ/n_it (τ = bound_ratio · ref_t; 0 when τ = 0)
                                               reject: the frame is rejected
    h_t ← ref_t (first round) or history · h_t + (1 − history) · ref_t

A median stays with the honest senders as long as fewer than half of a round's senders are hostile; the history
keeps a hostile majority (or a round of two senders, whose median is their mean) from moving the bound more than
``history_ratio`` × what past rounds had.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from node.config import ReduceConfig

QUANTUM_BITS = 12


def quantize(x: float) -> float:
    """``x`` (finite, ≥ 0) rounded to 12 significant bits: the same float on every replica (module doc)."""
    if x <= 0.0 or not math.isfinite(x):
        return 0.0 if x <= 0.0 else x
    mantissa, exponent = math.frexp(x)
    return math.ldexp(round(mantissa * (1 << QUANTUM_BITS)) / (1 << QUANTUM_BITS), exponent)


def median(values: Sequence[float]) -> float:
    """The middle value (even count: the mean of the two middle ones). Raises ValueError when empty."""
    if not values:
        raise ValueError("median of no values")
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


@dataclass(frozen=True)
class BoundDecision:
    """What the bounds decided for one round.

    ``reference``: ref_t per tensor; ``factors``: per sender (input order), per tensor, the factor its payload is
    scaled by (1.0: untouched; < 1: clipped); ``rejected``: per sender, "" or why the whole frame is dropped;
    ``history``: h_t after this round."""

    reference: tuple[float, ...]
    factors: tuple[tuple[float, ...], ...]
    rejected: tuple[str, ...]
    history: tuple[float, ...]

    def clipped(self, i: int) -> int:
        """How many of sender ``i``'s tensors were clipped."""
        return sum(1 for f in self.factors[i] if f < 1.0)


def decide(names: Sequence[str], norms: Sequence[Sequence[float]], history: Sequence[float],
           cfg: ReduceConfig) -> BoundDecision:
    """Apply the module's rule. ``names``: the tensors (for messages); ``norms``: per sender, per tensor, quantized
    L2 norms (≥ 0); ``history``: h_t per tensor (0: none yet). With ``cfg.bound == "none"`` nothing is clipped or
    rejected, but the reference and history are still computed (for reports). Raises ValueError for no senders or a
    row of the wrong length."""
    if not norms:
        raise ValueError("bounds need at least one sender")
    T = len(names)
    if any(len(row) != T for row in norms) or len(history) != T:
        raise ValueError(f"bounds: every sender needs one norm per tensor ({T}), and the history one per tensor")
    reference, new_history = [], []
    for t in range(T):
        ref = median([row[t] for row in norms])
        h = history[t]
        if cfg.history > 0 and h > 0:
            ref = min(ref, cfg.history_ratio * h)
        reference.append(ref)
        new_history.append(0.0 if cfg.history == 0 else (ref if h <= 0 else cfg.history * h + (1 - cfg.history) * ref))
    factors, rejected = [], []
    for row in norms:
        fs, why = [], ""
        for t, n in enumerate(row):
            ref = reference[t]
            tau = cfg.bound_ratio * ref
            f = 1.0
            if cfg.bound != "none" and not why:
                if ref > 0 and n > cfg.absurd_ratio * ref:
                    why = (f"tensor {names[t]!r}: norm {n:.4g} is {n / ref:.3g} × the round's reference {ref:.4g} "
                           f"(more than reduce.absurd_ratio {cfg.absurd_ratio:g}): absurd, rejected")
                elif n > tau:
                    if cfg.bound == "reject":
                        why = (f"tensor {names[t]!r}: norm {n:.4g} is above reduce.bound_ratio {cfg.bound_ratio:g} × "
                               f"the round's reference {ref:.4g}: rejected")
                    else:
                        f = tau / n if tau > 0 else 0.0
            fs.append(f)
        factors.append(tuple(fs))
        rejected.append(why)
    return BoundDecision(tuple(reference), tuple(factors), tuple(rejected), tuple(new_history))
