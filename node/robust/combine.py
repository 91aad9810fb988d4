"""Robust combinations of a round's (bounded) payloads for one tensor: ``reduce.robust`` (docs/algorithms.md §11).

Every function takes the payloads in sender order and returns one fp32 tensor of ``shape``; every one is exact and
independent of machine details: sorting, elementwise arithmetic and sums accumulated row by row in a fixed order.

- ``none``: the codec's own reduce (mean, vote, selector-mean, ... as its parameters say).
- ``trimmed_mean``: per coordinate, drop the b = ⌊trim·n⌋ largest and b smallest decoded values (b ≤ (n−1)/2) and
  average the rest. Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
  arXiv 1803.01498.
- ``median``: per coordinate, the median of the decoded values (even n: mean of the two middle ones); same paper.
- ``vote``: sign payloads only: ``sign(Σ ±1) × mean of the (bounded) scales``, ``SignCodec.vote``.
- ``clipped_selector_mean``: DCT-top-k payloads only, ``DctTopKCodec.clipped_selector_mean``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from node.compress.base import Codec, Encoded, Shape, median0, sorted0
from node.config import ReduceConfig


def trim_count(n: int, trim: float) -> int:
    """How many values are cut from each side of a column of ``n``: ⌊trim·n⌋, at most (n − 1) // 2."""
    return min(int(trim * n), (n - 1) // 2)


def trimmed_mean(decoded: torch.Tensor, trim: float) -> torch.Tensor:
    """``decoded`` (n, ...) fp32 → (...): the mean of each column's values without its b largest and b smallest
    (``trim_count``), accumulated from the smallest kept value up."""
    n = decoded.shape[0]
    b = trim_count(n, trim)
    s = sorted0(decoded)
    total = s[b].clone()
    for j in range(b + 1, n - b):
        total.add_(s[j])
    return total.div_(n - 2 * b)


def combine(codec: Codec, encs: Sequence[Encoded], shape: Shape, cfg: ReduceConfig) -> torch.Tensor:
    """The ``cfg.robust`` combination of ``encs`` (bounded payloads of one tensor, in sender order) → fp32 tensor of
    ``shape``. Raises ValueError for no payloads, or a mode the codec cannot run (the config refuses those first)."""
    if not encs:
        raise ValueError("reduce needs at least one payload")
    mode = cfg.robust
    if mode == "none":
        return codec.reduce(encs, shape)
    if mode in ("trimmed_mean", "median"):
        decoded = torch.stack([codec.decode(e, shape) for e in encs])  # (n, *shape) fp32
        return trimmed_mean(decoded, cfg.trim) if mode == "trimmed_mean" else median0(decoded)
    if mode == "vote":
        vote = getattr(codec, "vote", None)
        if vote is None:
            raise ValueError(f"reduce.robust = vote needs sign payloads, not {codec.name}")
        return vote(encs, shape)
    if mode == "clipped_selector_mean":
        clipped = getattr(codec, "clipped_selector_mean", None)
        if clipped is None:
            raise ValueError(f"reduce.robust = clipped_selector_mean needs dct_topk payloads, not {codec.name}")
        return clipped(encs, shape, cfg.bound_ratio)
    raise ValueError(f"unknown reduce.robust {mode!r}")
