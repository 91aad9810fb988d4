"""Codec configuration errors and the content validation of payloads from outside. Helpers:
codecs_harness.py."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from codecs_harness import _x
from node.compress import CODECS, DctTopKCodec, SignCodec, make_codec
from node.compress.base import Codec
from node.compress.bitpack import pack_uints
from node.errors import ConfigError, PayloadError


# -- configuration errors --------------------------------------------------------------------------------

def test_make_codec_unknown_name() -> None:
    with pytest.raises(ConfigError, match="'topk_dct'"):
        make_codec("topk_dct")


@pytest.mark.parametrize("name,params,needle", [
    ("identity", {"k": 3}, "'identity'"),
    ("sign", {"blocks": 3}, "blocks"),
    ("dct_topk", {"topk": 3}, "topk"),
    ("sign", {"block": -1}, "sign.block"),
    ("sign", {"block": 2.5}, "sign.block"),
    ("sign", {"block": True}, "sign.block"),
    ("sign", {"block": "8"}, "sign.block"),
    ("sign", {"scale_dtype": "f64"}, "sign.scale_dtype"),
    ("sign", {"reduce": "median"}, "sign.reduce"),
    ("dct_topk", {"k": 0}, "dct_topk.k"),
    ("dct_topk", {"k": 32.0}, "dct_topk.k"),
    ("dct_topk", {"chunk": 0}, "dct_topk.chunk"),
    ("dct_topk", {"chunk": 10.0}, "dct_topk.chunk"),
    ("dct_topk", {"values": "int4"}, "dct_topk.values"),
    ("dct_topk", {"reduce": "vote"}, "dct_topk.reduce"),
])
def test_make_codec_bad_params(name: str, params: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        make_codec(name, params)


def test_codec_registry() -> None:
    assert set(CODECS) == {"identity", "bf16", "fp16", "sign", "dct_topk", "sparse_topk"}
    for name, cls in CODECS.items():
        assert cls.name == name and issubclass(cls, Codec)
    assert isinstance(make_codec("sign"), SignCodec) and isinstance(make_codec("dct_topk"), DctTopKCodec)
    assert make_codec("dct_topk").params() == {"k": 32, "chunk": 64, "values": "f16", "reduce": "selector-mean"}
    assert make_codec("sign").params() == {"block": 0, "scale_dtype": "f32", "reduce": "mean"}


# -- validation of payloads from outside -----------------------------------------------------------------

BAD_FLOATS = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("bad", BAD_FLOATS)
@pytest.mark.parametrize("name", ["identity", "bf16", "fp16"])
def test_validate_dense_rejects_non_finite(name: str, bad: float) -> None:
    codec = make_codec(name)
    enc = codec.encode(torch.ones(5, 2))
    codec.validate(enc, (5, 2))
    enc["values"][7] = bad
    with pytest.raises(PayloadError, match="'values'"):
        codec.validate(enc, (5, 2))


@pytest.mark.parametrize("scale_dtype", ["f32", "f16", "bf16"])
def test_validate_sign_scales(scale_dtype: str) -> None:
    codec = make_codec("sign", dict(block=10, scale_dtype=scale_dtype))
    shape = (35,)
    enc = codec.encode(_x(shape))
    codec.validate(enc, shape)
    for bad in BAD_FLOATS:
        e = {k: v.clone() for k, v in enc.items()}
        e["scales"][2] = bad
        with pytest.raises(PayloadError, match="non-finite"):
            codec.validate(e, shape)
    e = {k: v.clone() for k, v in enc.items()}
    e["scales"][3] = -0.5
    with pytest.raises(PayloadError, match="negative"):
        codec.validate(e, shape)
    e["scales"][3] = -0.0  # negative zero is zero
    codec.validate(e, shape)
    e["bits"].fill_(0xFF)  # any bit pattern is a valid sign payload
    codec.validate(e, shape)


@pytest.mark.parametrize("values", ["f16", "bf16", "f32", "int8", "sign"])
def test_validate_dct_topk_non_finite_and_negative(values: str) -> None:
    codec = make_codec("dct_topk", dict(k=4, values=values))
    shape = (128,)
    enc = codec.encode(_x(shape))
    codec.validate(enc, shape)
    float_key = "values" if values in ("f16", "bf16", "f32") else "scales"
    for bad in BAD_FLOATS:
        e = {k: v.clone() for k, v in enc.items()}
        e[float_key][1] = bad
        with pytest.raises(PayloadError, match="non-finite"):
            codec.validate(e, shape)
    if "scales" in enc:
        e = {k: v.clone() for k, v in enc.items()}
        e["scales"][1] = -1.0
        with pytest.raises(PayloadError, match="negative"):
            codec.validate(e, shape)


def _topk_payload(indices: list[int], width: int, count: int) -> dict[str, torch.Tensor]:
    return {"indices": pack_uints(torch.tensor(indices), width), "values": torch.ones(count, dtype=torch.float16)}


def test_validate_dct_topk_index_range() -> None:
    codec = make_codec("dct_topk", dict(k=4, chunk=64))
    shape = (48,)  # one block of 48 coefficients, 6-bit indices: 48..63 are representable but invalid
    assert codec.layout(shape)["indices"].numel == 3
    codec.validate(_topk_payload([0, 5, 10, 47], 6, 4), shape)
    for bad in ([0, 5, 10, 48], [0, 5, 10, 63], [50, 51, 52, 53]):
        with pytest.raises(PayloadError, match="block size 48"):
            codec.validate(_topk_payload(bad, 6, 4), shape)
    # 2-D: (48, 16) → one 48×16 block of 768, 10-bit indices
    shape2 = (48, 16)
    codec.validate(_topk_payload([0, 1, 700, 767], 10, 4), shape2)
    with pytest.raises(PayloadError, match="block size 768"):
        codec.validate(_topk_payload([0, 1, 700, 768], 10, 4), shape2)
    with pytest.raises(PayloadError, match="block size 768"):
        codec.validate(_topk_payload([1023, 1023, 1023, 1023], 10, 4), shape2)


def test_validate_dct_topk_index_order() -> None:
    codec = make_codec("dct_topk", dict(k=4, chunk=64))
    shape = (192,)  # three blocks of 64
    ok = [0, 1, 2, 63] + [60, 61, 62, 63] + [0, 10, 20, 30]  # ascending within each block only
    codec.validate(_topk_payload(ok, 6, 12), shape)
    for bad in ([5, 0, 10, 20] + ok[4:],           # unordered
                ok[:4] + [60, 61, 61, 63] + ok[8:],  # duplicate
                ok[:8] + [30, 20, 10, 0]):           # descending
        with pytest.raises(PayloadError, match="strictly ascending"):
            codec.validate(_topk_payload(bad, 6, 12), shape)


def test_validate_dct_topk_int8_range() -> None:
    codec = make_codec("dct_topk", dict(k=4, values="int8"))
    shape = (64,)
    enc = codec.encode(_x(shape))
    enc["values"][:] = torch.tensor([127, -127, 0, 1], dtype=torch.int8).view(torch.uint8)
    codec.validate(enc, shape)
    enc["values"][2] = 128  # the byte of int8 -128
    with pytest.raises(PayloadError, match="-128"):
        codec.validate(enc, shape)


def test_validate_dct_topk_lossless_has_no_index_checks() -> None:
    codec = make_codec("dct_topk", dict(k=64, values="f32"))
    shape = (64,)
    enc = codec.encode(_x(shape))
    assert enc["indices"].numel() == 0
    codec.validate(enc, shape)
    enc["values"][0] = float("nan")
    with pytest.raises(PayloadError):
        codec.validate(enc, shape)
