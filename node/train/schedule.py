"""Inner learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio`` of the peak."""
from __future__ import annotations

import math


def inner_lr(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Learning rate for the 0-based inner ``step`` (the step about to be taken)."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = peak * min_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(configured: int | None, total: int) -> int:
    """``None`` means min(500, 10% of the run)."""
    return configured if configured is not None else min(500, total // 10)


def round_inner_lr(peak: float, configured_warmup: int | None, total: int, min_ratio: float, H: int,
                   round_: int) -> float:
    """η_t of round ``round_``: the lr of its last inner step. A pure function of the round, so the
    coordinator and a late joiner compute exactly the value the other workers used."""
    return inner_lr((round_ + 1) * H - 1, peak, warmup_steps(configured_warmup, total), total, min_ratio)
