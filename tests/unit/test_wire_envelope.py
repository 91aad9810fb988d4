"""The payload envelope: round trips for every codec, exact sizes, and precise rejections, each naming what is
wrong. Shared frames and helpers: wire_harness.py."""
from __future__ import annotations

import hashlib
from typing import Any, Callable

import msgpack
import pytest
import torch

from node import wire
from node.compress import make_codec
from node.compress.base import Codec
from node.compress.bitpack import pack_uints
from node.errors import PayloadError
from wire_harness import (CODECS, FRAMES, RUN, ROUND, SENDER, SIGN, SIGN_FRAME, SPEC, WIRE_CODECS, IDS, _body, _frame,
                          _raw, _reframe, _reframe_raw)


# -- round trips ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params", WIRE_CODECS, ids=IDS)
def test_round_trip(name: str, params: dict[str, Any]) -> None:
    codec = make_codec(name, params)
    frame, enc = _frame(codec)
    env = wire.unpack(frame, codec, SPEC, RUN, ROUND)
    assert (env.run, env.round, env.sender, env.nbytes) == (RUN, ROUND, SENDER, len(frame))
    assert list(env.tensors) == [t.name for t in SPEC]
    for t in SPEC:
        got, want = env.tensors[t.name], enc[t.name]
        assert list(got) == list(codec.layout(t.shape))
        for key in want:
            assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape
            assert _raw(got[key]) == _raw(want[key]), (t.name, key)
        assert torch.equal(codec.decode(got, t.shape), codec.decode(want, t.shape))
    assert wire.expected_size(codec, SPEC, RUN, SENDER, ROUND) == len(frame)
    assert wire.max_frame_size(codec, SPEC) >= len(frame)
    payload = sum(codec.nbytes(t.shape) for t in SPEC)
    assert payload < len(frame) < payload + 400  # the envelope overhead is small and bounded
    # the round check is optional; bytearray and memoryview are accepted too
    assert wire.unpack(bytearray(frame), codec, SPEC, RUN).round == ROUND
    assert wire.unpack(memoryview(frame), codec, SPEC, RUN, ROUND).sender == SENDER


def test_pack_uses_layout_order_and_is_deterministic() -> None:
    codec = make_codec("dct_topk", dict(values="int8"))
    frame, enc = _frame(codec)
    reordered = {name: dict(reversed(list(e.items()))) for name, e in enc.items()}
    assert wire.pack(RUN, ROUND, SENDER, codec, SPEC, reordered) == frame
    body = _body(frame)
    assert body["tensors"] == [[t.name, list(t.shape)] for t in SPEC]
    assert set(body) == {"v", "run", "round", "sender", "codec", "codec_v", "params", "tensors", "buffers"}
    assert body["codec"] == "dct_topk" and body["params"] == codec.params() and body["v"] == wire.FORMAT_VERSION
    for t, bufs in zip(SPEC, body["buffers"]):
        assert bufs == [_raw(enc[t.name][key]) for key in codec.layout(t.shape)]
    assert frame.startswith(wire.MAGIC)
    assert frame[-8:] == hashlib.blake2b(frame[4:-8], digest_size=8).digest()


@pytest.mark.parametrize("round_", [0, 127, 128, 65536, 2 ** 40])
@pytest.mark.parametrize("sender", ["w", "x" * 256, "é" * 256, "\U0001F600" * 256])
def test_expected_and_max_size(round_: int, sender: str) -> None:
    for spec in (SPEC, [wire.TensorSpec("w", ())]):
        for cid in ("identity-", "sign-", "dct_topk-"):
            codec = CODECS[cid]
            frame, _ = _frame(codec, spec, round_=round_, sender=sender)
            assert wire.expected_size(codec, spec, RUN, sender, round_) == len(frame)
            assert wire.max_frame_size(codec, spec) >= len(frame)  # every honest sender fits
            assert wire.unpack(frame, codec, spec, RUN, round_).sender == sender


def test_model_spec() -> None:
    named = [("a.weight", torch.zeros(4, 3)), ("a.bias", torch.zeros(3)), ("s", torch.tensor(1.0))]
    assert wire.model_spec(named) == [wire.TensorSpec("a.weight", (4, 3)), wire.TensorSpec("a.bias", (3,)),
                                      wire.TensorSpec("s", ())]


# -- precise rejections ------------------------------------------------------------------------------------

def _mutated(mutate: Callable[[dict[str, Any]], None], frame: bytes = SIGN_FRAME) -> bytes:
    body = _body(frame)
    mutate(body)
    return _reframe(body)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda b: b.__setitem__(key, value)


def _expect(frame: Any, needle: str, codec: Codec = SIGN, spec: list[wire.TensorSpec] = SPEC, run: str = RUN,
            round_: int | None = ROUND, limit: int | None = None) -> None:
    with pytest.raises(PayloadError) as info:
        wire.unpack(frame, codec, spec, run, round_, limit)
    assert needle in str(info.value)


def test_reject_wrong_run() -> None:
    _expect(SIGN_FRAME, "payload is for run 'run-a', this run is 'run-b'", run="run-b")
    _expect(_mutated(_set("run", 5)), "field 'run' must be a string")


def test_reject_wrong_round() -> None:
    _expect(SIGN_FRAME, "payload is for round 7, expected round 8", round_=8)
    for bad in (-1, True, 7.0, "7", None):
        _expect(_mutated(_set("round", bad)), "field 'round' must be a non-negative integer", round_=None)


def test_reject_wrong_codec_name_and_version() -> None:
    _expect(SIGN_FRAME, "payload codec 'sign' v1 differs from this run's 'identity' v1", codec=CODECS["identity-"])
    _expect(FRAMES["dct_topk-"], "payload codec 'dct_topk'", codec=SIGN)
    _expect(_mutated(_set("codec_v", 2)), "payload codec 'sign' v2 differs")
    _expect(_mutated(_set("codec_v", True)), "payload codec 'sign' vTrue differs")
    _expect(_mutated(_set("codec", None)), "payload codec None")


def test_reject_wrong_codec_params() -> None:
    other = make_codec("sign", dict(block=100))
    _expect(SIGN_FRAME, "payload codec parameters {'block': 0, 'scale_dtype': 'f32', 'reduce': 'mean'} differ from "
                        "this run's {'block': 100", codec=other)
    for params in ({"block": False, "scale_dtype": "f32", "reduce": "mean"},  # False == 0, but is not an int
                   {"block": 0.0, "scale_dtype": "f32", "reduce": "mean"},
                   {"block": 0, "scale_dtype": "f32"},
                   {"block": 0, "scale_dtype": "f32", "reduce": "mean", "extra": 1},
                   [0, "f32", "mean"], None):
        _expect(_mutated(_set("params", params)), "payload codec parameters")


def test_reject_wrong_version() -> None:
    for bad in (2, 0, True, 1.0, "1", None):
        _expect(_mutated(_set("v", bad)), "envelope format version")


def test_reject_bad_sender() -> None:
    for bad in ("", "x" * 257, 3, None, b"worker"):
        _expect(_mutated(_set("sender", bad)), "field 'sender' must be a non-empty string of at most 256")


def test_reject_wrong_tensor_name() -> None:
    spec = [SPEC[0], wire.TensorSpec("blocks.0.attn.b", (16,)), SPEC[2]]
    _expect(SIGN_FRAME, "tensors[1] is 'blocks.0.attn.bias', expected 'blocks.0.attn.b'", spec=spec)


def test_reject_wrong_shape() -> None:
    codec = CODECS["identity-"]
    spec = [wire.TensorSpec("blocks.0.attn.weight", (16, 48))] + SPEC[1:]  # same element count
    _expect(FRAMES["identity-"], "tensor 'blocks.0.attn.weight' has shape [48, 16], the model has [16, 48]",
            codec=codec, spec=spec)
    _expect(_mutated(lambda b: b["tensors"][2].__setitem__(1, [1])), "tensor 'blocks.0.ln.gain' has shape [1]")
    _expect(_mutated(lambda b: b["tensors"][1].__setitem__(1, [16.0])), "has shape [16.0]")
    _expect(_mutated(lambda b: b["tensors"][1].__setitem__(1, 16)), "has shape 16")


def test_reject_missing_and_extra_tensor() -> None:
    frame, _ = _frame(SIGN, SPEC[:2])
    _expect(frame, "payload has 2 tensors, the model has 3")
    frame, _ = _frame(SIGN, SPEC + [wire.TensorSpec("head.weight", (4,))])
    _expect(frame, "payload has 4 tensors, the model has 3")
    _expect(_mutated(lambda b: b["buffers"].pop()), "field 'buffers' must hold one list per tensor")
    _expect(_mutated(_set("tensors", {"a": 1})), "payload has no list of tensors")
    _expect(_mutated(_set("buffers", b"")), "field 'buffers' must hold one list per tensor")
    _expect(_mutated(lambda b: b["tensors"].__setitem__(0, ["blocks.0.attn.weight"])), "tensors[0] must be [name, shape]")
    _expect(_mutated(lambda b: b["tensors"].__setitem__(0, "blocks.0.attn.weight")), "tensors[0] must be [name, shape]")


def test_reject_extra_or_missing_field() -> None:
    _expect(_mutated(_set("extra", 1)), "envelope fields are ['buffers', 'codec', 'codec_v', 'extra',")
    _expect(_mutated(lambda b: b.pop("sender")), "envelope fields are ['buffers', 'codec', 'codec_v', 'params',")
    _expect(_reframe([1, 2, 3]), "envelope must be a map, got list")
    _expect(_reframe({b"v": 1}), "envelope fields are")


def test_reject_buffer_of_wrong_length_or_type() -> None:
    codec = CODECS["identity-"]
    frame = FRAMES["identity-"]
    _expect(_mutated(lambda b: b["buffers"][0].__setitem__(0, b["buffers"][0][0][:-1]), frame),
            "tensor 'blocks.0.attn.weight' buffer 'values' is 3071 bytes, expected 3072", codec=codec)
    _expect(_mutated(lambda b: b["buffers"][2].__setitem__(0, b"\x00" * 8), frame),
            "tensor 'blocks.0.ln.gain' buffer 'values' is 8 bytes, expected 4", codec=codec)
    _expect(_mutated(lambda b: b["buffers"][1].__setitem__(0, "x" * 64), frame),
            "tensor 'blocks.0.attn.bias' buffer 'values' must be binary", codec=codec)
    _expect(_mutated(lambda b: b["buffers"][1].append(b""), frame),
            "tensor 'blocks.0.attn.bias' must carry 1 buffers ['values']", codec=codec)
    _expect(_mutated(lambda b: b["buffers"][1].pop()), "tensor 'blocks.0.attn.bias' must carry 2 buffers ['bits', 'scales']")
    _expect(_mutated(lambda b: b["buffers"].__setitem__(1, b"abc")), "must carry 2 buffers")


def test_reject_bad_contents_behind_a_valid_digest() -> None:
    nan = torch.tensor([float("nan")]).numpy().tobytes()
    frame = _mutated(lambda b: b["buffers"][2].__setitem__(0, nan), FRAMES["identity-"])
    _expect(frame, "tensor 'blocks.0.ln.gain': identity: buffer 'values' holds non-finite values",
            codec=CODECS["identity-"])
    neg = torch.tensor([-1.0]).numpy().tobytes()
    _expect(_mutated(lambda b: b["buffers"][2].__setitem__(1, neg)),
            "tensor 'blocks.0.ln.gain': sign: buffer 'scales' holds negative values")
    codec = CODECS["dct_topk-"]  # (48, 16): one block of 768, 32 ten-bit indices
    bad_idx = pack_uints(torch.tensor(list(range(31)) + [1000]), 10).numpy().tobytes()
    _expect(_mutated(lambda b: b["buffers"][0].__setitem__(0, bad_idx), FRAMES["dct_topk-"]),
            "tensor 'blocks.0.attn.weight': dct_topk: an index is ≥ the block size 768", codec=codec)
    dup_idx = pack_uints(torch.tensor([0] + list(range(31))), 10).numpy().tobytes()
    _expect(_mutated(lambda b: b["buffers"][0].__setitem__(0, dup_idx), FRAMES["dct_topk-"]),
            "not strictly ascending", codec=codec)


def test_reject_bad_magic_and_digest() -> None:
    _expect(b"LBW2" + SIGN_FRAME[4:], "payload does not start with the lowband magic b'LBW1'")
    corrupt = bytearray(SIGN_FRAME)
    corrupt[40] ^= 0x10
    _expect(bytes(corrupt), "payload digest mismatch")
    _expect(SIGN_FRAME[:-1] + bytes([SIGN_FRAME[-1] ^ 1]), "payload digest mismatch")
    _expect(SIGN_FRAME + b"\x00", "payload digest mismatch")


def test_reject_invalid_msgpack_behind_a_valid_digest() -> None:
    body = SIGN_FRAME[4:-8]
    _expect(_reframe_raw(body + b"\xc0"), "payload body is not valid msgpack")  # trailing data
    _expect(_reframe_raw(body[:-3]), "payload body is not valid msgpack")
    _expect(_reframe_raw(b"\xc1"), "payload body is not valid msgpack")  # the never-used byte
    _expect(_reframe_raw(msgpack.packb({1: 2})), "payload body is not valid msgpack")  # non-string key
    _expect(_reframe_raw(msgpack.packb(msgpack.ExtType(5, b"x"))), "payload body is not valid msgpack")


def test_reject_too_large_and_truncated() -> None:
    _expect(SIGN_FRAME, f"payload is {len(SIGN_FRAME)} bytes, more than the limit of 100 for this model", limit=100)
    limit = wire.max_frame_size(SIGN, SPEC)
    _expect(SIGN_FRAME + b"\x00" * (limit + 1 - len(SIGN_FRAME)), f"more than the limit of {limit}")
    for n in range(13):
        _expect(SIGN_FRAME[:n], f"payload is truncated ({n} bytes)")


@pytest.mark.parametrize("data", ["text", None, 42, [1, 2], SIGN_FRAME.hex()])
def test_reject_not_bytes(data: Any) -> None:
    _expect(data, f"payload must be bytes, got {type(data).__name__}")
