"""Shared by the payload-envelope test modules (test_wire_envelope.py, test_wire_fuzz.py): their
module-scoped one-thread fixture (imported by each, so it applies to each), the model spec, the codecs under
test and their frames (built once), and frame helpers."""
from __future__ import annotations

import hashlib
from typing import Any

import msgpack
import torch
from hypothesis import HealthCheck, settings

from node import wire
from node.compress import make_codec
from node.compress.base import Codec, Encoded


RUN, ROUND, SENDER = "run-a", 7, "worker-1"
SPEC = [wire.TensorSpec("blocks.0.attn.weight", (48, 16)), wire.TensorSpec("blocks.0.attn.bias", (16,)),
        wire.TensorSpec("blocks.0.ln.gain", ())]
TINY_SPEC = [wire.TensorSpec("w", (3,))]
WIRE_CODECS: list[tuple[str, dict[str, Any]]] = [
    ("identity", {}), ("bf16", {}), ("fp16", {}),
    ("sign", {}), ("sign", dict(block=100, scale_dtype="f16", reduce="vote")),
    ("dct_topk", {}), ("dct_topk", dict(k=4, chunk=10, values="bf16", reduce="mean")),
    ("dct_topk", dict(k=8, values="int8")), ("dct_topk", dict(k=8, values="sign")),
    ("dct_topk", dict(k=4096, values="f32")),
]
IDS = [f"{n}-" + "-".join(map(str, p.values())) for n, p in WIRE_CODECS]
FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _encode_all(codec: Codec, spec: list[wire.TensorSpec], seed: int = 0) -> dict[str, Encoded]:
    g = torch.Generator().manual_seed(seed)
    return {t.name: codec.encode(torch.randn(t.shape, generator=g)) for t in spec}


def _frame(codec: Codec, spec: list[wire.TensorSpec] = SPEC, seed: int = 0, run: str = RUN, round_: int = ROUND,
           sender: str = SENDER) -> tuple[bytes, dict[str, Encoded]]:
    enc = _encode_all(codec, spec, seed)
    return wire.pack(run, round_, sender, codec, spec, enc), enc


def _body(frame: bytes) -> dict[str, Any]:
    return msgpack.unpackb(frame[len(wire.MAGIC):-wire.DIGEST_BYTES], raw=False)


def _reframe_raw(body: bytes) -> bytes:
    return wire.MAGIC + body + hashlib.blake2b(body, digest_size=8).digest()


def _reframe(obj: Any) -> bytes:
    return _reframe_raw(msgpack.packb(obj, use_bin_type=True))


def _raw(buf: torch.Tensor) -> bytes:
    return buf.contiguous().view(torch.uint8).numpy().tobytes()


# frames used by the property tests, built once
CODECS = {cid: make_codec(n, p) for cid, (n, p) in zip(IDS, WIRE_CODECS)}
FRAMES = {cid: _frame(codec)[0] for cid, codec in CODECS.items()}


SIGN = CODECS["sign-"]
SIGN_FRAME = FRAMES["sign-"]
