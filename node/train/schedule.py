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
