"""Payload codecs (axis 1): dense, 1-bit sign, DCT-top-k, chunked top-k with quantized values; plus error feedback."""
from __future__ import annotations

from typing import Any

from node.compress.base import BufferSpec, Codec, Encoded, Shape
from node.compress.dct_topk import DctTopKCodec
from node.compress.dense import Bf16Codec, DenseCodec, Fp16Codec
from node.compress.feedback import ErrorFeedback, NoFeedback, make_feedback
from node.compress.sign import SignCodec
from node.compress.sparse_topk import SparseTopKCodec
from node.errors import ConfigError

CODECS: dict[str, type[Codec]] = {c.name: c for c in (DenseCodec, Bf16Codec, Fp16Codec, SignCodec, DctTopKCodec,
                                                       SparseTopKCodec)}


def make_codec(name: str, params: dict[str, Any] | None = None) -> Codec:
    """Build a codec by its wire name; unknown names or parameters raise ConfigError naming them."""
    cls = CODECS.get(name)
    if cls is None:
        raise ConfigError(f"unknown codec {name!r}; known: {sorted(CODECS)}")
    try:
        return cls(**(params or {}))
    except TypeError as exc:
        raise ConfigError(f"codec {name!r}: bad parameters {params}: {exc}") from None


__all__ = ["BufferSpec", "Codec", "Encoded", "Shape", "CODECS", "make_codec", "ErrorFeedback", "NoFeedback",
           "make_feedback", "DenseCodec", "Bf16Codec", "Fp16Codec", "SignCodec", "DctTopKCodec", "SparseTopKCodec"]
