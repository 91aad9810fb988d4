"""Recommended ``[reduce]`` settings for runs with untrusted members, per codec (docs/algorithms.md §11; their cost on
clean runs and what they buy under attack: BENCHMARKS.md, "Byzantine members").

- every codec: ``bound = "clip"`` at 2× the round's median norm per tensor (4× the history at most), absurd frames
  (1000×) rejected, a member whose frames were clipped or rejected 4 times in its last 8 evicted;
- dense payloads (``identity``, ``bf16``, ``fp16``): coordinate-wise ``trimmed_mean``, cutting ⌊0.25·n⌋ per side;
- ``sign``: majority ``vote`` with the bounded scales;
- ``dct_topk``: ``clipped_selector_mean``;
- ``sparse_topk``: the bound alone (its codec's mean of the clipped payloads).
"""
from __future__ import annotations

from typing import Any

from node.config import Recipe

COMMON: dict[str, Any] = {"bound": "clip", "bound_ratio": 2.0, "evict_after": 4, "evict_window": 8}
ROBUST_BY_CODEC = {"identity": "trimmed_mean", "bf16": "trimmed_mean", "fp16": "trimmed_mean", "sign": "vote",
                   "dct_topk": "clipped_selector_mean"}


def untrusted(codec: str) -> dict[str, Any]:
    """The recommended ``reduce`` table for payloads of ``codec`` (its fields as keys)."""
    return {**COMMON, "robust": ROBUST_BY_CODEC.get(codec, "none")}


def untrusted_overrides(recipe: Recipe) -> dict[str, Any]:
    """The same as ``--set`` overrides (``{"reduce.bound": "clip", ...}``) for ``recipe``'s codec."""
    return {f"reduce.{k}": v for k, v in untrusted(recipe.codec.name).items()}
