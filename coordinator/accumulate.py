"""A round's reduce taken frame by frame, as the coordinator accepts them, instead of all at once when it closes.

Where members receive one aggregate (``[rounds] result = "aggregate"`` or ``"compressed"``) nobody but the
coordinator reduces the round's frames, so the order it adds them in is its own choice: the order it accepted them.
Each accepted frame is added into a running fp32 sum per tensor (the codec's ``accumulate``: the same additions as
its ``reduce``, in that order) and, for each buffer, an fp64 sum (floating) or a running max / any (integer / bool),
as ``Reference.reduce_buffers`` does. Closing the round is then a division per tensor, not N decodes: at 256 members
of a 10M-parameter sign model that is the difference between ~6 s of the coordinator's CPU at the close and none.

The order is part of what was committed: the write-ahead record lists it (``applied["order"]``, under the record's
checksum) and a replay adds the logged frames in that order (``coordinator/commit.py``), so the state it rebuilds is
bit-identical. Rounds whose reduce needs every frame at once — the robust reduce (node/robust/), a codec whose reduce
is a vote or a selector mean (``Codec.accumulates`` False) — are reduced at the close as before (``applies``).
"""
from __future__ import annotations

from typing import Any

import torch

from node import wire
from node.train.buffer_reduce import add_buffer, finish_buffer
from node.train.reference import Aggregate, Reference


class RunningReduce:
    """The running reduce of one round's frames on ``reference``'s model (its codec, shapes and buffers); holds one
    fp32 tensor per trainable tensor and one per buffer (fp64 for floating buffers) — O(model), not O(members)."""

    def __init__(self, reference: Reference) -> None:
        self.codec, self.device = reference.codec, reference.device
        self.names, self.shapes = list(reference.names), [tuple(t.shape) for t in reference.tensors]
        self.buffer_spec = list(reference.buffer_spec)
        self.order: list[str] = []  # senders, in the order their frames were added
        self._totals: list[torch.Tensor | None] = [None] * len(self.names)
        self._buffers: list[torch.Tensor | None] = [None] * len(self.buffer_spec)

    @staticmethod
    def applies(reference: Reference, applied: dict[str, Any]) -> bool:
        """Whether a round applied as ``applied`` (commit.applied_as) on ``reference`` is reduced frame by frame:
        members receive an aggregate, no robust reduce, and the codec's reduce is an ordered mean."""
        return (applied.get("result") in ("aggregate", "compressed") and reference.robust is None
                and reference.codec.accumulates)

    def add(self, env: wire.Envelope) -> None:
        """Add one validated frame (``wire.unpack``'s envelope for this model). Raises ValueError for a sender
        already added (a frame counts once)."""
        if env.sender in self.order:
            raise ValueError(f"{env.sender}'s frame is in the round already")
        for i, (name, shape) in enumerate(zip(self.names, self.shapes)):
            enc = {k: v.to(self.device) for k, v in env.tensors[name].items()}
            self._totals[i] = self.codec.accumulate(self._totals[i], enc, shape)  # (numel,) or shape, fp32
        for j, spec in enumerate(self.buffer_spec):  # the buffers' rule, frame by frame (node/train/buffer_reduce.py)
            self._buffers[j] = add_buffer(self._buffers[j], env.extra[spec.name].to(self.device), spec)
        self.order.append(env.sender)

    def aggregate(self) -> Aggregate:
        """The round's reduce over every frame added: what ``Reference.reduce`` gives for the same frames in the same
        order, bit for bit. Leaves the running sums as they are (a commit that fails is prepared again). Raises
        ValueError when no frame was added."""
        if not self.order:
            raise ValueError("no frame was added to the round's reduce")
        n = len(self.order)
        tensors = []
        for total, shape in zip(self._totals, self.shapes):
            assert total is not None
            tensors.append(self.codec.finish(total, n, shape))
        buffers = []
        for spec, total in zip(self.buffer_spec, self._buffers):
            assert total is not None
            buffers.append(finish_buffer(total, n, spec))
        return Aggregate(tensors, buffers)
