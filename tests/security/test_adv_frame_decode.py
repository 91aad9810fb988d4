"""Adversarial review (adv-models): what a frame costs its receiver before its fields — or its signature — are known
to be good. A frame within the model's size limit whose msgpack body is one long run of empty arrays (1 byte each)
made ``wire.unpack`` build ~66 Python objects' worth of memory per byte of frame: 33 MB for a 0.5 MB frame, 1 GB for
the 15 MB sign frame of a 124M-parameter model, 30+ GB for a dense (identity) one — on the coordinator, which
verifies every member's frame on arrival, and on every node. With a signature that does not verify, the body was
still decoded in full to explain the refusal (``_claims``); with the sender's own valid signature it was decoded by
``_decode_body``. Fixed: the body is decoded within the arrays and maps an envelope of this model can hold
(``wire._Shape``)."""
from __future__ import annotations

import hashlib
import tracemalloc

import msgpack
import pytest

from node import wire
from node.compress import make_codec
from node.errors import PayloadError
from node.identity import NodeKey
from node.keyring import KeyRing, frame_message

CODEC = make_codec("sign", {"block": 0, "scale_dtype": "f32", "reduce": "mean"})
SPEC = [wire.TensorSpec("w", (4_000_000,))]


def _bomb(limit: int, key: NodeKey, valid_signature: bool) -> bytes:
    """A signed frame naming run 'r', round 3, sender 'w1', padded to ``limit`` with arrays of empty arrays."""
    n, per, chunks = limit - 300, (1 << 20) - 1, []
    while n > 0:
        k = min(per, n - 5)
        chunks.append(b"\xdd" + k.to_bytes(4, "big") + b"\x90" * k)
        n -= k + 5
    body = (b"\x84" + b"".join(msgpack.packb(x) for x in ("run", "r", "round", 3, "sender", "w1", "junk"))
            + b"\xdd" + len(chunks).to_bytes(4, "big") + b"".join(chunks))
    sig = key.sign(frame_message("r", 3, "w1", hashlib.sha256(body).digest()) if valid_signature else b"other")
    signed = body + sig
    return wire.SIGNED_MAGIC + signed + wire._digest(signed)


@pytest.mark.parametrize("valid_signature", [False, True], ids=["forged", "signed-by-the-member"])
def test_a_frame_of_empty_arrays_costs_its_receiver_no_more_than_a_few_times_its_size(valid_signature: bool) -> None:
    limit = wire.max_frame_size(CODEC, SPEC)
    key = NodeKey.generate()
    frame = _bomb(limit, key if valid_signature else NodeKey.generate(), valid_signature)
    assert len(frame) <= limit
    ring = KeyRing({"w1": key.public})
    tracemalloc.start()
    try:
        with pytest.raises(PayloadError):
            wire.unpack(frame, CODEC, SPEC, "r", 3, sender="w1", keys=ring)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(frame), f"refusing a {len(frame)} B frame allocated {peak} B ({peak / len(frame):.0f}x)"
