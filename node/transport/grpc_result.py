"""A round's result as a member reads it from the coordinator's ``Collect`` stream, under bounds it knows itself.

The coordinator is one party on the network: a broken or hostile one could announce, or simply stream, any number of
bytes. A member reads no more than its own model allows (``ResultLimits``, node/transport/limits.py): a header that
announces more is refused before anything is buffered, and a piece past what the header announced ends the stream. Either way
the result is ``MALFORMED`` with the reason, and the frames' own checks (node/wire.py) still run on what is kept.
"""
from __future__ import annotations

from typing import Any, Iterator

from node.identity import PUBLIC_BYTES
from node.proto.lowband.v1 import coordinator_pb2 as pb
from node.transport.limits import ResultLimits
from node.transport.messages import RoundResult, RoundStatus


def _status(header: pb.CollectHeader) -> RoundStatus:
    return RoundStatus.COMMITTED if header.committed else RoundStatus.NO_QUORUM


def _malformed(round_: int, why: str) -> RoundResult:
    return RoundResult(round_, RoundStatus.MALFORMED, reason=why)


def _announced(header: pb.CollectHeader, limits: ResultLimits) -> list[int] | str:
    """The bytes the header announces per part (one part: the aggregate), or why they are refused."""
    if len(header.members) > limits.members:
        return f"the result names {len(header.members)} members, more than the run's {limits.members}"
    if header.aggregate_size:
        if header.aggregate_size > limits.aggregate:
            return (f"the aggregate is announced as {header.aggregate_size} bytes, more than the "
                    f"{limits.aggregate} any aggregate of this model takes")
        return [header.aggregate_size]
    if len(header.payload_sizes) != len(header.members):
        return f"the result has {len(header.payload_sizes)} sizes for {len(header.members)} members"
    big = [s for s in header.payload_sizes if s > limits.frame]
    if big:
        return f"a frame is announced as {big[0]} bytes, more than the {limits.frame} any frame of this model takes"
    return list(header.payload_sizes)


def assemble(stream: Iterator[pb.CollectChunk], round_: int, own: bytes | None, own_name: str,
             limits: ResultLimits, progressed: Any = lambda: None) -> RoundResult:
    """Read one ``Collect`` answer: the header first, then each part's pieces in order. ``own``: this member's frame
    (the coordinator does not send it back when we submitted it); ``progressed``: called per message (a stall
    watch). MALFORMED when the answer breaks the protocol or the bounds; never buffers more than the header
    announced within ``limits``."""
    header: pb.CollectHeader | None = None
    sizes: list[int] = []
    parts: dict[int, bytearray] = {}
    for chunk in stream:
        progressed()
        if chunk.HasField("header"):
            if header is not None:
                return _malformed(round_, "the result has two headers")
            header = chunk.header
            announced = _announced(header, limits)
            if isinstance(announced, str):
                return _malformed(round_, announced)
            sizes = announced
            continue
        if header is None:
            return _malformed(round_, "result pieces before the result's header")
        piece = chunk.piece
        if piece.member >= len(sizes):
            return _malformed(round_, f"a result piece for part {piece.member} of {len(sizes)}")
        buf = parts.setdefault(piece.member, bytearray())
        if piece.offset != len(buf):
            return _malformed(round_, f"result pieces of member {piece.member} out of order")
        if len(buf) + len(piece.data) > sizes[piece.member]:
            return _malformed(round_, f"part {piece.member} runs past its announced {sizes[piece.member]} bytes")
        buf += piece.data
    if header is None:
        return _malformed(round_, "empty result stream")
    sent = len(own) if own is not None and own_name in header.members else 0
    if header.aggregate_size:
        data = bytes(parts.get(0, b""))
        if len(data) != header.aggregate_size:
            return _malformed(round_, f"aggregate arrived incomplete ({len(data)}/{header.aggregate_size})")
        return RoundResult(round_, _status(header), {}, header.reason, bytes_sent=sent, bytes_received=len(data),
                           reference_fingerprint=header.reference_fingerprint, aggregate=data,
                           aggregate_codec=header.aggregate_codec, aggregate_members=tuple(header.members))
    payloads: dict[str, bytes] = {}
    received = 0
    for i, (name, size) in enumerate(zip(header.members, header.payload_sizes)):
        if name == own_name and own is not None:
            payloads[name] = own
            continue
        data = bytes(parts.get(i, b""))
        if len(data) != size:
            return _malformed(round_, f"payload of {name} arrived incomplete ({len(data)}/{size})")
        payloads[name] = data
        received += size
    keys = list(header.member_keys)
    if keys and (len(keys) != len(header.members) or any(len(k) != PUBLIC_BYTES for k in keys)):
        return _malformed(round_, f"the result's member keys are malformed ({len(keys)} for "
                          f"{len(header.members)} members, each must be {PUBLIC_BYTES} bytes)")
    return RoundResult(round_, _status(header), dict(sorted(payloads.items())), header.reason,
                       bytes_sent=sent, bytes_received=received, reference_fingerprint=header.reference_fingerprint,
                       member_keys=dict(zip(header.members, keys)))
