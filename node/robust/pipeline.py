"""One round's bounded, robust reduce (``reduce`` in a recipe not at its default): frames → aggregate + report + the
next robust state. ``Reference.reduce`` calls it; everything in it is a deterministic function of the round's frames
(sorted by sender) and of the replicated ``RobustState``, so every replica gets the same bits and decisions.

    frames of evicted members                 → dropped ("evicted at round r: …"); their record notes the round
    n_it = quantize(codec.norm(payload_it))   per sender i and tensor t, in the codec's own representation
    bounds.decide(n, history)                 → clip factors, rejections, reference norms, next history
    payload_it ← codec.scaled(payload_it, f_it)
    A_t = combine(codec, kept payloads of t)  reduce.robust (combine.py); zeros when nothing is kept
    report: norm ratio, cosine to A, clipped, rejected per member;  ledger: record_frame per member (eviction)
    ledger pruned                             RobustState.pruned: bounded, alike on every replica
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from node.compress.base import Codec, Shape
from node.config import ReduceConfig
from node.robust import bounds
from node.robust.combine import combine
from node.robust.report import MemberReport, RoundReport
from node.robust.state import MemberRecord, RobustState, record_frame

if TYPE_CHECKING:
    from node.wire import Envelope


@dataclass(frozen=True)
class RobustOutcome:
    """``tensors``: the aggregate, one fp32 tensor per trainable tensor (model order); ``kept``: the envelopes whose
    payloads entered it (their buffers are the round's); ``report``; ``state``: the robust state after the round."""

    tensors: list[torch.Tensor]
    kept: list["Envelope"]
    report: RoundReport
    state: RobustState


def reduce_round(codec: Codec, names: Sequence[str], shapes: Sequence[Shape], envelopes: Sequence["Envelope"],
                 state: RobustState, cfg: ReduceConfig, round_: int, device: torch.device) -> RobustOutcome:
    """See the module doc. ``envelopes``: the round's validated frames, sorted by sender (at least one)."""
    members: dict[str, MemberReport] = {}
    records = dict(state.members)
    considered = []
    for env in envelopes:
        gone = state.evicted(env.sender)
        if gone is not None:
            members[env.sender] = MemberReport(env.sender, math.nan, math.nan, None,
                                               rejected=f"evicted at round {gone.evicted_at}: {gone.reason}")
            # an evicted member still sending stays among the evicted records pruning keeps
            records[env.sender] = dataclasses.replace(gone, last_round=round_)
        else:
            considered.append(env)
    if not considered:
        zeros = [torch.zeros(s, dtype=torch.float32, device=device) for s in shapes]
        return RobustOutcome(zeros, [], RoundReport(round_, 0.0, members),
                             RobustState(state.history, records).pruned(round_))
    encs = [[{k: v.to(device) for k, v in env.tensors[n].items()} for n in names] for env in considered]
    norms = [[bounds.quantize(codec.norm(enc, s)) for enc, s in zip(row, shapes)] for row in encs]
    decision = bounds.decide(names, norms, state.history, cfg)
    kept = [i for i, why in enumerate(decision.rejected) if not why]
    aggregate = []
    for t, (name, shape) in enumerate(zip(names, shapes)):
        bounded = [codec.scaled(encs[i][t], shape, decision.factors[i][t]) for i in kept]
        aggregate.append(combine(codec, bounded, shape, cfg) if bounded
                         else torch.zeros(shape, dtype=torch.float32, device=device))
    ref_norm = math.sqrt(sum(r * r for r in decision.reference))
    agg_norm = math.sqrt(sum(float(a.double().square().sum()) for a in aggregate))
    dots = [0.0] * len(considered)
    for t, (shape, a) in enumerate(zip(shapes, aggregate)):
        for i, d in enumerate(codec.dots([row[t] for row in encs], shape, a)):
            dots[i] += d
    evicted = {}
    for i, env in enumerate(considered):
        norm = math.sqrt(sum(n * n for n in norms[i]))
        ratio = norm / ref_norm if ref_norm > 0 else math.nan
        dot = dots[i]
        cosine = dot / (norm * agg_norm) if norm > 0 and agg_norm > 0 else None
        if cosine is not None:
            cosine = max(-1.0, min(1.0, cosine))  # quantized norms can put |cos| a hair above 1
        clipped = decision.clipped(i)
        report = MemberReport(env.sender, norm, ratio, cosine, clipped, min(decision.factors[i]),
                              decision.rejected[i])
        members[env.sender] = report
        before = records.get(env.sender, MemberRecord())
        after = record_frame(before, round_, report.flagged, clipped > 0, bool(report.rejected),
                             None if math.isnan(ratio) else ratio, cosine, cfg)
        records[env.sender] = after
        if after.evicted and not before.evicted:
            evicted[env.sender] = after.reason
    report = RoundReport(round_, ref_norm, members, tuple(considered[i].sender for i in kept),
                         {considered[i].sender: decision.factors[i] for i in kept}, evicted)
    return RobustOutcome(aggregate, [considered[i] for i in kept], report,
                         RobustState(decision.history, records).pruned(round_))
