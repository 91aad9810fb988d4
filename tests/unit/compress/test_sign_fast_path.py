"""The sign codec's fast paths (node/compress/ordered_sum.py's ordered sums, node/compress/signbits.py's numpy
packing, table decode and tiled reduce) give exactly the bytes and floats of a straightforward implementation written
here: a per-element chunk index with ``index_add_`` for the sums (what frames were first defined with), bits packed
with explicit weights, decode as ``(2·bit − 1) · scale[chunk]``, reduce as a sum of decodes. Shapes and chunk lengths
are drawn by hypothesis: empty tensors, block 0 and 1, lengths not divisible by 8 nor by the block, magnitudes that
overflow an fp32 sum (the fp64 path); explicit cases cross the reduce's 65,536-element tiles."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from node.compress.base import WIRE_DTYPES, saturate
from node.compress.bitpack import pack_bools, pack_bools_tensor, unpack_bools, unpack_bools_tensor
from node.compress.ordered_sum import chunk_abs_sums, chunk_abs_sums_tensor
from node.compress.sign import SignCodec
from node.compress.signbits import pack_signs, signed_values, signed_values_tensor

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
#: longer than the reduce's 65,536-element tiles, and not a multiple of 8 or of any block below
LONG = 2 * 65_536 + 13


def _chunk_index(n: int, block: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64) if block == 0 else torch.arange(n) // block


def reference_encode(x: torch.Tensor, block: int, scale_dtype: str) -> dict[str, bytes]:
    """Scales from index_add_ sums over a per-element chunk index (fp64 where fp32 overflows), bits one by one."""
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    chunks = 0 if n == 0 else (1 if block == 0 else math.ceil(n / block))
    ids = _chunk_index(n, block)
    sums = torch.zeros(chunks).index_add_(0, ids, flat.abs())
    counts = torch.bincount(ids, minlength=chunks).to(torch.float32)
    means = sums / counts.clamp_min(1)
    if chunks and not bool(torch.isfinite(means).all()):
        means = torch.zeros(chunks, dtype=torch.float64).index_add_(0, ids, flat.abs().double()) / counts.double()
    positive = torch.cat([(flat >= 0).long(), torch.zeros((-n) % 8, dtype=torch.int64)]).view(-1, 8)  # (bytes, 8)
    bits = (positive << torch.arange(8)).sum(dim=1).to(torch.uint8)  # bit i of byte j: element 8j + i
    return {"bits": _bits_of(bits), "scales": _bits_of(saturate(means, WIRE_DTYPES[scale_dtype]))}


def reference_decode(enc: dict[str, torch.Tensor], n: int, block: int) -> torch.Tensor:
    i = torch.arange(n)
    signs = ((enc["bits"].long()[i // 8] >> (i % 8)) & 1).float() * 2 - 1  # (n,) ±1
    return signs * enc["scales"].to(torch.float32)[_chunk_index(n, block)]


def reference_vote(encs: list[dict[str, torch.Tensor]], n: int, block: int) -> torch.Tensor:
    votes = sum(reference_decode({"bits": e["bits"], "scales": torch.ones_like(e["scales"])}, n, block) for e in encs)
    mean_scale = sum(e["scales"].to(torch.float32) for e in encs) / len(encs)
    return torch.sign(votes) * mean_scale[_chunk_index(n, block)]


def reference_sums(values: list[float], block: int, dtype: type) -> list[float]:
    """Python loop, numpy scalars: ((0 + |a0|) + |a1|) + … per chunk, each addition in ``dtype``."""
    length = len(values) if block == 0 else block
    out = []
    with np.errstate(over="ignore"):
        for start in range(0, len(values), max(length, 1)):
            acc = dtype(0)
            for v in values[start:start + length]:
                acc = dtype(acc + dtype(abs(np.float32(v))))
            out.append(float(acc))
    return out


def _bits_of(t: torch.Tensor) -> bytes:
    """The raw bytes of ``t`` (numpy has no bf16: viewed as int16)."""
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()


def _values(n: int, seed: int, lo: int, hi: int) -> torch.Tensor:
    """(n,) fp32, magnitudes 10^lo .. 10^hi (clamped to fp32's range), both signs, some ±0."""
    g = torch.Generator().manual_seed(seed)
    exponents = torch.randint(lo, hi + 1, (n,), generator=g).double()
    mant = torch.rand(n, generator=g, dtype=torch.float64) * 9 + 1
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    x = (sign * mant * 10.0 ** exponents).clamp(-3.4e38, 3.4e38).float()
    x[torch.rand(n, generator=g) < 0.05] = 0.0
    x[torch.rand(n, generator=g) < 0.05] = -0.0
    return x


@st.composite
def cases(draw: st.DrawFn) -> tuple[torch.Tensor, int, str]:
    shape = draw(st.one_of(st.lists(st.integers(0, 300), min_size=1, max_size=1).map(tuple),
                           st.lists(st.integers(0, 13), min_size=2, max_size=3).map(tuple), st.just(())))
    n = math.prod(shape)
    block = draw(st.one_of(st.just(0), st.just(1), st.integers(2, 9), st.integers(10, 400)))
    lo = draw(st.integers(-45, 38))
    hi = draw(st.integers(lo, 38))
    x = _values(n, draw(st.integers(0, 2**31 - 1)), lo, hi).reshape(shape)
    return x, block, draw(st.sampled_from(["f32", "f16", "bf16"]))


def _check_codec(x: torch.Tensor, block: int, scale_dtype: str, payloads: int = 3) -> None:
    codec = SignCodec(block=block, scale_dtype=scale_dtype)
    n, shape = x.numel(), tuple(x.shape)
    enc = codec.encode(x)
    ref = reference_encode(x, block, scale_dtype)
    assert _bits_of(enc["bits"]) == ref["bits"]
    assert _bits_of(enc["scales"]) == ref["scales"]
    assert _bits_of(codec.decode(enc, shape)) == _bits_of(reference_decode(enc, n, block).reshape(shape))
    # reduce over several payloads (different signs, same magnitudes' decades): vote and mean
    encs = [enc] + [codec.encode(x * s) for s in (-1.0, 0.5)][:payloads - 1]
    vote = SignCodec(block=block, scale_dtype=scale_dtype, reduce="vote")
    assert _bits_of(vote.reduce(encs, shape)) == _bits_of(reference_vote(encs, n, block).reshape(shape))
    decoded = [reference_decode(e, n, block) for e in encs]
    mean = decoded[0].clone()
    for d in decoded[1:]:
        mean.add_(d)
    assert _bits_of(codec.reduce(encs, shape)) == _bits_of(mean.div_(len(encs)).reshape(shape))


@PROPERTY
@given(cases())
def test_encode_decode_reduce_equal_the_reference(case: tuple[torch.Tensor, int, str]) -> None:
    _check_codec(*case)


@pytest.mark.parametrize("block", [0, 1, 5, 100, 128, 129, 1000, 65_536, 70_000, LONG, LONG + 1])
@pytest.mark.parametrize("decades", [(-3, 1), (37, 38)], ids=["normal", "overflowing"])
def test_long_tensors_across_tiles_equal_the_reference(block: int, decades: tuple[int, int]) -> None:
    _check_codec(_values(LONG, block, *decades), block, "f32", payloads=2)


def test_non_finite_inputs_give_the_references_bytes() -> None:
    x = torch.tensor([1.0, float("nan"), -2.0, float("inf"), -float("inf"), 0.5, -0.0, 3.0, 4.0])
    for block in (0, 2, 4):
        enc = SignCodec(block=block).encode(x)
        ref = reference_encode(x, block, "f32")
        assert (_bits_of(enc["bits"]), _bits_of(enc["scales"])) == (ref["bits"], ref["scales"])


def test_an_fp32_sum_that_overflows_takes_the_fp64_path() -> None:
    x = torch.full((1000,), 3.0e38)
    x[::2] *= -1
    codec = SignCodec()
    enc = codec.encode(x)
    assert float(enc["scales"][0]) == codec.wire_limit()  # the fp64 mean (3e38), saturated: finite on the wire
    assert _bits_of(enc["scales"]) == reference_encode(x, 0, "f32")["scales"]


@PROPERTY
@given(st.integers(0, 200), st.integers(0, 40), st.integers(-45, 38), st.integers(0, 2**31 - 1),
       st.sampled_from([torch.float32, torch.float64]))
def test_chunk_abs_sums_add_left_to_right(n: int, block: int, lo: int, seed: int, dtype: torch.dtype) -> None:
    x = _values(n, seed, lo, min(38, lo + 8))
    got = chunk_abs_sums(x, block, dtype)
    assert got.dtype == dtype
    assert got.tolist() == reference_sums(x.tolist(), block, np.float32 if dtype == torch.float32 else np.float64)


@pytest.mark.parametrize("block", [0, 1, 7, 300])
def test_the_tensor_sums_for_other_devices_agree_up_to_rounding(block: int) -> None:
    x = _values(1001, block, -3, 2)
    fast, tensor = chunk_abs_sums(x, block, torch.float32), chunk_abs_sums_tensor(x, block, torch.float32)
    assert fast.shape == tensor.shape
    torch.testing.assert_close(tensor, fast, rtol=1e-5, atol=0)


def test_chunk_abs_sums_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="block"):
        chunk_abs_sums(torch.ones(3), -1, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        chunk_abs_sums(torch.ones(3), 0, torch.float16)
    assert chunk_abs_sums(torch.ones(0), 4, torch.float64).shape == (0,)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001, LONG])
def test_numpy_and_tensor_bit_packing_give_the_same_bytes(n: int) -> None:
    bits = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.5
    packed = pack_bools(bits)
    assert _bits_of(packed) == _bits_of(pack_bools_tensor(bits))
    assert torch.equal(unpack_bools(packed, n), unpack_bools_tensor(packed, n))
    assert torch.equal(unpack_bools(packed, n), bits)


@pytest.mark.parametrize("block", [0, 1, 3, 8, 100])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_numpy_and_tensor_sign_expansion_give_the_same_floats(n: int, block: int) -> None:
    g = torch.Generator().manual_seed(n + block)
    packed = pack_bools(torch.rand(n, generator=g) < 0.5)
    chunks = 0 if n == 0 else (1 if block == 0 else math.ceil(n / block))
    scales = torch.rand(chunks, generator=g)
    if chunks:
        scales[0] = 0.0  # −1 · 0 = −0 on both paths
    got = signed_values(packed, scales, n, block)
    assert got.shape == (n,) and got.dtype == torch.float32
    assert _bits_of(got) == _bits_of(signed_values_tensor(packed, scales, n, block))
    assert _bits_of(got) == _bits_of(reference_decode({"bits": packed, "scales": scales}, n, block))


def test_packed_signs_match_on_both_paths() -> None:
    x = torch.tensor([1.0, -1.0, 0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45])
    assert pack_signs(x).tolist() == pack_bools(x >= 0).tolist() == [0b10101101, 0b0]
