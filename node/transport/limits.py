"""What a node reads at most of one answer from the network, from its own model (node/wire.py's ``max_frame_size``
for the run's codec and the dense aggregate codecs) and the run's ``membership.max_nodes``: a coordinator, or a peer,
that announces more is refused before anything is buffered (node/transport/grpc_result.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ResultLimits:
    """The most a member reads of one answer: ``frame`` bytes of one member's frame, ``aggregate`` bytes of an
    aggregate frame (the run's codec or a dense one), ``members`` members in one result, ``state`` bytes of a state
    download."""

    frame: int
    aggregate: int
    members: int
    state: int

    @classmethod
    def for_model(cls, reference: Any, max_members: int) -> "ResultLimits":
        """From a ``Reference`` (node/train/reference.py): its codec, model spec and buffers. The state bound allows
        θ_ref in fp32 plus three optimizer buffers of the same size and a generous header."""
        # imported here: the state download a fresh node starts before it imports torch (state_prefetch.py) reads
        # under UNKNOWN_MODEL, and must not import torch through this module
        from node import wire
        from node.compress import make_codec
        from node.train.downlink import DENSE_AGGREGATE_CODECS

        frame = wire.max_frame_size(reference.codec, reference.spec, reference.buffer_spec)
        dense = max(wire.max_frame_size(make_codec(name), reference.spec, reference.buffer_spec)
                    for name in DENSE_AGGREGATE_CODECS)
        extra = sum(e.nbytes for e in reference.buffer_spec)
        return cls(frame, max(frame, dense), max(1, max_members), 4 * (reference.dense_bytes() + extra) + (16 << 20))


#: before the model is known (a state downloaded while the node starts up, tests with no model): generous, finite
UNKNOWN_MODEL = ResultLimits(frame=1 << 30, aggregate=4 << 30, members=4096, state=64 << 30)
