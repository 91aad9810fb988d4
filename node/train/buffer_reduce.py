"""The agreed value of a model buffer (BatchNorm's running statistics, its ``num_batches_tracked``) over a round's
frames — one rule, taken all at once (``reduce_buffer``) or frame by frame (``add_buffer`` … ``finish_buffer``), so
every replica, the coordinator's running reduce and a shard owner compute the same bits:

- floating buffers: the mean — an fp64 sum in the frames' order, one division, cast back to the buffer's dtype (never
  overflowing, bit-identical wherever the order is the same);
- integer buffers: the elementwise max (a counter such as ``num_batches_tracked``: the furthest member's count);
- bool buffers: any.

Shapes: each value has the buffer's shape; the result too, in the buffer's dtype.
"""
from __future__ import annotations

from typing import Sequence

import torch

from node.wire import ExtraSpec


def add_buffer(total: torch.Tensor | None, value: torch.Tensor, spec: ExtraSpec) -> torch.Tensor:
    """``total`` (None before the first frame; fp64 for a floating buffer) with one more frame's ``value`` added, in
    place where it can be; returns the new total."""
    if spec.dtype.is_floating_point:
        base = torch.zeros(spec.shape, dtype=torch.float64, device=value.device) if total is None else total
        return base.add_(value.to(torch.float64))
    if total is None:
        return value.clone()
    if spec.dtype == torch.bool:
        return total.logical_or_(value)
    return torch.maximum(total, value, out=total)


def finish_buffer(total: torch.Tensor, count: int, spec: ExtraSpec) -> torch.Tensor:
    """The agreed value from the total of ``count`` frames (a new tensor; ``total`` is left as it is)."""
    return total.div(count).to(spec.dtype) if spec.dtype.is_floating_point else total.clone()


def reduce_buffer(values: Sequence[torch.Tensor], spec: ExtraSpec) -> torch.Tensor:
    """The agreed value over ``values`` (one per frame, in the frames' order). Raises ValueError for no value."""
    if not values:
        raise ValueError(f"buffer {spec.name!r}: no value to reduce")
    total: torch.Tensor | None = None
    for v in values:
        total = add_buffer(total, v, spec)
    assert total is not None
    return finish_buffer(total, len(values), spec)
