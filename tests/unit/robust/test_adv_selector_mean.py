"""Adversarial review (adv-models): ONE member of 8 against ``clipped_selector_mean`` (the recommended robust reduce
for ``dct_topk``, node/robust/defaults.py), never clipped or flagged.

Selector-mean divides each DCT coefficient by the number of senders that picked it, so a coefficient only the attacker
picks enters the aggregate at the attacker's full value; the clip bounds each value by 2 × the median block maximum
and the per-tensor bound keeps its norm under 2 × the median norm — and within both the attacker puts its whole
budget on the k coefficients per block *next to* its own (≈ the honest members') top-k, against the honest direction.
Measured on a (256, 256) tensor whose honest updates agree (g + 0.1·noise): the aggregate moves by 1.35 × the honest
aggregate's norm (cosine to it 0.48; the same attacker flipping its own update at 1.95 × its norm moves it by 0.53,
and an 8th honest member by 0.13), and the attacker's frame is never clipped, so it is never evicted. A plain mean
would give it 1/8 of the weight (≤ 0.25 here).

Fixed: a coefficient's sum is divided by max(picks, ⌈n/2⌉) (DctTopKCodec.clipped_selector_mean)."""
from __future__ import annotations

import pytest
import torch

from node.compress import dct, make_codec
from node.config import ReduceConfig
from node.robust.defaults import untrusted
from node.robust.pipeline import reduce_round
from node.robust.state import RobustState
from node.wire import Envelope

CODEC = make_codec("dct_topk", {"k": 32, "chunk": 64, "values": "f16", "reduce": "selector-mean"})
SHAPE = (256, 256)


def _env(name: str, x: torch.Tensor) -> Envelope:
    return Envelope(run="r", round=0, sender=name, tensors={"w": CODEC.encode(x)}, nbytes=0, extra={})


def _beside_the_top_k(x: torch.Tensor, ratio: float = 1.95) -> torch.Tensor:
    """k coefficients per block where x's top-k is not (the next largest), against x, at ``ratio`` × x's sent norm."""
    plan, kept, _ = CODEC._dims(SHAPE)
    c = dct.forward(x, plan)
    top = torch.topk(c.abs(), kept, dim=1).indices
    rest = c.abs().scatter(1, top, -1.0)
    pick = torch.topk(rest, kept, dim=1).indices
    vals = -torch.sign(c.gather(1, pick))
    vals = vals * (ratio * float(c.gather(1, top).norm()) / float(vals.norm()))
    return dct.inverse(torch.zeros_like(c).scatter(1, pick, vals), plan)


def test_one_unflagged_member_of_8_moves_the_clipped_selector_mean_little() -> None:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(SHAPE, generator=gen)
    xs = [g + 0.1 * torch.randn(SHAPE, generator=gen) for _ in range(8)]
    cfg = ReduceConfig(**untrusted("dct_topk"))
    honest = CODEC.clipped_selector_mean([CODEC.encode(x) for x in xs[:7]], SHAPE, cfg.bound_ratio)
    envs = [_env(f"w{i}", x) for i, x in enumerate(xs[:7])] + [_env("w7", _beside_the_top_k(xs[7]))]
    out = reduce_round(CODEC, ["w"], [SHAPE], envs, RobustState.fresh(1), cfg, 0, torch.device("cpu"))
    member = out.report.members["w7"]
    assert member.clipped == 0 and not member.rejected and not member.flagged  # the attacker stays unaccountable
    moved = float((out.tensors[0] - honest).norm() / honest.norm())
    assert moved < 0.6, f"one member of 8 moved the aggregate by {moved:.2f} × its norm"
