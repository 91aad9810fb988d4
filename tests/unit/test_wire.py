"""The payload envelope: round trips for every codec, exact sizes, precise rejections, and fuzzing (truncation,
bit flips, random bytes, type confusion behind a valid digest, buffer contents) that must only ever end in a
PayloadError or a correct envelope."""
from __future__ import annotations

import copy
import hashlib
import math
from typing import Any, Callable

import msgpack
import pytest
import torch

from node.compress.base import MAX_MAGNITUDE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node import wire
from node.compress import dct, make_codec
from node.compress.base import Codec, Encoded
from node.compress.bitpack import pack_uints
from node.errors import PayloadError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: intra-op threads only contend (4× slower on a busy 2-core box); restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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

SIGN = CODECS["sign-"]
SIGN_FRAME = FRAMES["sign-"]


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
        # (int8 q ≤ 127, sign ±1): any bytes must validate to finite decodes or be rejected. bf16/f32 values
        # near 3.4e38 pass validation and overflow (see the xfail below), so only their indices are fuzzed.
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
