"""The payload envelope under fuzzing (truncation, bit flips, random bytes, type confusion behind a valid
digest, buffer contents): it must only ever end in a PayloadError or a correct envelope. Shared frames and
helpers: wire_harness.py."""
from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node import wire
from node.compress import dct
from node.compress.base import MAX_MAGNITUDE, Codec
from node.compress.bitpack import pack_uints
from node.errors import PayloadError
from wire_harness import (CODECS, FRAMES, FUZZ, IDS, RUN, ROUND, SIGN, SIGN_FRAME, SPEC, TINY_SPEC, _body, _frame,
                          _raw, _reframe, _reframe_raw)


# -- property-based -----------------------------------------------------------------------------------------

def _unpack_or_error(frame: Any, codec: Codec, spec: list[wire.TensorSpec] = SPEC,
                     round_: int | None = ROUND) -> wire.Envelope | PayloadError:
    """Anything but a PayloadError or an Envelope propagates and fails the test."""
    try:
        return wire.unpack(frame, codec, spec, RUN, round_)
    except PayloadError as exc:
        assert str(exc)  # the message names something
        return exc


@FUZZ
@given(cid=st.sampled_from(IDS), data=st.data())
def test_truncation_is_rejected(cid: str, data: st.DataObject) -> None:
    frame = FRAMES[cid]
    n = data.draw(st.integers(0, len(frame) - 1), label="length")
    assert isinstance(_unpack_or_error(frame[:n], CODECS[cid]), PayloadError)


@pytest.mark.parametrize("cid", IDS)
def test_every_truncation_of_a_small_frame_is_rejected(cid: str) -> None:
    frame, _ = _frame(CODECS[cid], TINY_SPEC)
    for n in range(len(frame)):
        assert isinstance(_unpack_or_error(frame[:n], CODECS[cid], TINY_SPEC), PayloadError), n


def _flip(frame: bytes, bit: int) -> bytes:
    out = bytearray(frame)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@FUZZ
@given(cid=st.sampled_from(IDS), data=st.data())
def test_any_bit_flip_is_rejected(cid: str, data: st.DataObject) -> None:
    frame = FRAMES[cid]
    bit = data.draw(st.integers(0, 8 * len(frame) - 1), label="bit")
    result = _unpack_or_error(_flip(frame, bit), CODECS[cid])
    assert isinstance(result, PayloadError)
    assert ("digest mismatch" if bit >= 32 else "magic") in str(result)


@pytest.mark.parametrize("cid", ["identity-", "sign-", "dct_topk-", "dct_topk-8-int8"])
def test_every_bit_flip_of_a_small_frame_is_rejected(cid: str) -> None:
    frame, _ = _frame(CODECS[cid], TINY_SPEC)
    for bit in range(8 * len(frame)):
        result = _unpack_or_error(_flip(frame, bit), CODECS[cid], TINY_SPEC)
        assert isinstance(result, PayloadError), bit
        assert ("digest mismatch" if bit >= 32 else "magic") in str(result), bit


@FUZZ
@given(data=st.one_of(st.binary(max_size=2048), st.binary(max_size=512).map(lambda b: wire.MAGIC + b)),
       cid=st.sampled_from(IDS))
def test_random_bytes_are_rejected(data: bytes, cid: str) -> None:
    assert isinstance(_unpack_or_error(data, CODECS[cid]), PayloadError)


@FUZZ
@given(body=st.binary(max_size=1024), cid=st.sampled_from(IDS))
def test_random_body_behind_a_valid_digest_is_rejected(body: bytes, cid: str) -> None:
    assert isinstance(_unpack_or_error(_reframe_raw(body), CODECS[cid]), PayloadError)


_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 63, 2 ** 64 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.binary(max_size=48),
    # near misses of the real values: equal under ==, or one edit away
    st.sampled_from([True, False, 0, 1, 1.0, 7, 7.0, -1, 2 ** 64 - 1, "", b"", "run-a", "sign", "dct_topk",
                     "blocks.0.attn.bias", "blocks.0.attn.weight", 16, 48, "f32", "mean", "selector-mean", 32, 64]),
)
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                       max_leaves=8)


def _near(orig: Any) -> list[Any]:
    """Values one confusion away from ``orig``: equal under == but of another type, or one edit off."""
    if isinstance(orig, bool):
        return [int(orig), float(orig), not orig]
    if isinstance(orig, int):
        out = [float(orig), str(orig), orig + 1, orig - 1, -orig - 1, [orig]]
        return out + ([bool(orig)] if orig in (0, 1) else [])
    if isinstance(orig, str):
        return [orig.encode(), orig + "x", orig[:-1], orig.upper(), [orig], None]
    if isinstance(orig, bytes):
        return [orig.decode("latin-1"), orig[:-1], orig + b"\x00", bytes(len(orig)), b"\xff" * len(orig), [orig]]
    if isinstance(orig, list):
        return [orig[:-1], orig + orig[-1:], orig[::-1], {str(i): v for i, v in enumerate(orig)}, [orig], []]
    if isinstance(orig, dict):
        return [list(orig.values()), dict(list(orig.items())[:-1]), {**orig, "x": 1}, {}]
    return [None]


def _paths(body: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Every field and nested element a sender controls."""
    out: list[tuple[Any, ...]] = [(k,) for k in body]
    out += [("params", k) for k in body["params"]]
    for i, (_, shape) in enumerate(body["tensors"]):
        out += [("tensors", i), ("tensors", i, 0), ("tensors", i, 1)] + [("tensors", i, 1, j) for j in range(len(shape))]
    for i, bufs in enumerate(body["buffers"]):
        out += [("buffers", i)] + [("buffers", i, j) for j in range(len(bufs))]
    return out


def _strict_equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
                and all(_strict_equal(a[k], b[k]) for k in a))
    if isinstance(a, list) or isinstance(b, list):
        return (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
                and all(_strict_equal(x, y) for x, y in zip(a, b)))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _check_accepted(env: wire.Envelope, sent: dict[str, Any], original: dict[str, Any], codec: Codec) -> None:
    """An accepted frame must be one an honest sender could have made: only the sender name and buffer
    contents (of exactly the right lengths) may differ from the original, and the envelope holds them."""
    for key in original:
        if key not in ("sender", "buffers"):
            assert _strict_equal(sent[key], original[key]), key
    assert isinstance(sent["sender"], str) and 0 < len(sent["sender"]) <= 256 and env.sender == sent["sender"]
    for t, bufs in zip(SPEC, sent["buffers"]):
        layout = codec.layout(t.shape)
        assert isinstance(bufs, list) and len(bufs) == len(layout)
        for raw, (key, spec) in zip(bufs, layout.items()):
            assert isinstance(raw, bytes) and len(raw) == spec.nbytes
            assert _raw(env.tensors[t.name][key]) == raw
        assert codec.decode(env.tensors[t.name], t.shape).shape == t.shape


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cid=st.sampled_from(IDS), data=st.data())
def test_type_confusion_behind_a_valid_digest(cid: str, data: st.DataObject) -> None:
    codec = CODECS[cid]
    original = _body(FRAMES[cid])
    body = copy.deepcopy(original)
    path = data.draw(st.sampled_from(_paths(body)), label="path")
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    action = data.draw(st.sampled_from(["replace", "replace", "replace", "delete", "insert"]), label="action")
    if action == "replace":
        near = st.sampled_from(_near(parent[path[-1]]))
        parent[path[-1]] = data.draw(st.one_of(near, near, _SCALARS, _VALUES), label="value")
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, list):
        parent.insert(path[-1], data.draw(_VALUES, label="value"))
    else:
        parent[data.draw(st.text(max_size=8).filter(lambda k: k not in parent), label="key")] = data.draw(_VALUES)
    result = _unpack_or_error(_reframe(body), codec)
    if isinstance(result, wire.Envelope):
        _check_accepted(result, body, original, codec)


@pytest.mark.parametrize("path,value", [
    (("v",), True), (("v",), 1.0), (("codec_v",), True), (("codec_v",), 1.0), (("round",), 7.0),
    (("params", "block"), False), (("params", "block"), 0.0), (("tensors", 1, 1, 0), 16.0),
    (("tensors", 1, 0), b"blocks.0.attn.bias"),
])
def test_values_equal_under_python_eq_but_of_another_type_are_rejected(path: tuple[Any, ...], value: Any) -> None:
    body = _body(SIGN_FRAME)
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    assert parent[path[-1]] == value or isinstance(value, bytes)
    parent[path[-1]] = value
    assert isinstance(_unpack_or_error(_reframe(body), SIGN), PayloadError)


# dct_topk content fuzz: valid lengths, valid digest, arbitrary contents
DCT_FUZZ = [cid for cid in IDS if cid.startswith("dct_topk")]


def _indices_strategy(nb: int, k: int, bs: int, width: int) -> st.SearchStrategy[bytes]:
    """Raw random bytes, or packed per-block index lists that are often valid (sorted, distinct, < bs) and
    sometimes not (values up to 2**width - 1, duplicates, any order)."""
    nbytes = math.ceil(nb * k * width / 8)
    ordered = st.lists(st.lists(st.integers(0, bs - 1), min_size=k, max_size=k, unique=True).map(sorted),
                       min_size=nb, max_size=nb)
    anything = st.lists(st.lists(st.integers(0, 2 ** width - 1), min_size=k, max_size=k), min_size=nb, max_size=nb)
    packed = st.one_of(ordered, ordered, anything).map(
        lambda blocks: pack_uints(torch.tensor([i for b in blocks for i in b], dtype=torch.int64), width)
        .numpy().tobytes())
    return st.one_of(st.binary(min_size=nbytes, max_size=nbytes), packed)


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cid=st.sampled_from(DCT_FUZZ), data=st.data())
def test_dct_topk_buffer_contents_fuzz(cid: str, data: st.DataObject) -> None:
    codec = CODECS[cid]
    body = _body(FRAMES[cid])
    for i, t in enumerate(SPEC):
        layout = codec.layout(t.shape)
        bufs = body["buffers"][i]
        keys = list(layout)
        idx_spec = layout["indices"]
        if idx_spec.numel:
            p = dct.plan_blocks(t.shape, codec.chunk)
            k = min(codec.k, p.block_size)
            width = math.ceil(math.log2(p.block_size))
            bufs[keys.index("indices")] = data.draw(_indices_strategy(p.nblocks, k, p.block_size, width),
                                                    label=f"{t.name}.indices")
        n = layout["values"].nbytes
        # formats whose magnitude is bounded by the format (f16 ≤ 65504) or by the honest f32 scales kept here
        # (int8 q ≤ 127, sign ±1): any bytes must validate to finite decodes or be rejected. bf16/f32 values are
        # bounded by the MAX_MAGNITUDE check (its own tests), so only their indices are fuzzed here.
        if codec.values in ("f16", "int8", "sign"):
            bufs[keys.index("values")] = data.draw(st.binary(min_size=n, max_size=n), label=f"{t.name}.values")
    result = _unpack_or_error(_reframe(body), codec)
    if isinstance(result, wire.Envelope):
        for t in SPEC:
            out = codec.decode(result.tensors[t.name], t.shape)
            assert out.shape == t.shape and out.dtype == torch.float32
            assert bool(torch.isfinite(out).all())
            both = codec.reduce([result.tensors[t.name], result.tensors[t.name]], t.shape)
            assert both.shape == t.shape and bool(torch.isfinite(both).all())


@pytest.mark.parametrize("cid,key,value", [("dct_topk-4-10-bf16-mean", "values", 3.0e38),
                                           ("dct_topk-4096-f32", "values", 3.0e38),
                                           ("dct_topk-8-int8", "scales", 3.0e38)])
def test_huge_values_are_rejected_before_they_can_overflow(cid: str, key: str, value: float) -> None:
    """Finite but huge buffers would overflow to inf in decode/reduce: validation bounds the magnitude."""
    codec = CODECS[cid]
    shape = (48, 16)
    enc = {k: v.clone() for k, v in codec.encode(torch.randn(shape)).items()}
    enc[key].fill_(value)
    if "values" in enc and enc["values"].dtype == torch.uint8 and key != "values":
        enc["values"].fill_(127)
    with pytest.raises(PayloadError, match="magnitude above"):
        codec.validate(enc, shape)
    enc[key].fill_(MAX_MAGNITUDE / 2)  # a near-maximal accepted magnitude still decodes and reduces finitely
    codec.validate(enc, shape)
    assert bool(torch.isfinite(codec.decode(enc, shape)).all())
    assert bool(torch.isfinite(codec.reduce([enc, enc], shape)).all())
