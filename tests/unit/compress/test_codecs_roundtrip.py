"""Every codec: exact layouts and byte formulas (oracle 12, docs/algorithms.md §8), determinism, reconstruction,
top-k selection, the int8/sign value formats and the sign codec's decode and bit order. Tables and helpers:
codecs_harness.py."""
from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch

from codecs_harness import (CONFIG_IDS, CONFIGS, SHAPES, SIGN_PARAMS, SMALL_CONFIGS, SMALL_IDS, _blocks, _raw,
                            _sign_expected, _x, expected_nbytes)
from node.compress import CODECS, make_codec
from node.compress.bitpack import pack_bools, unpack_uints


# -- layout and byte formulas (oracle 12) --------------------------------------------------------------

# every configuration on every shape, except that the largest shape gets the reduced set (time budget)
LAYOUT_CASES = [pytest.param(n, p, shape, id=f"{cid}-{shape}")
                for (n, p), cid in zip(CONFIGS, CONFIG_IDS) for shape in SHAPES
                if shape != (256, 128) or (n, p) in SMALL_CONFIGS]


@pytest.mark.parametrize("name,params,shape", LAYOUT_CASES)
def test_encode_matches_layout_and_byte_formula(name: str, params: dict[str, Any], shape: tuple[int, ...]) -> None:
    codec = make_codec(name, params)
    layout = codec.layout(shape)
    enc = codec.encode(_x(shape))
    assert list(enc) == list(layout)
    actual = 0
    for key, spec in layout.items():
        buf = enc[key]
        assert buf.dtype == spec.dtype, key
        assert buf.dim() == 1 and buf.numel() == spec.numel, key
        actual += buf.numel() * buf.element_size()
    assert codec.nbytes(shape) == actual == expected_nbytes(name, params, shape)
    codec.validate(enc, shape)  # an honest payload always validates
    out = codec.decode(enc, shape)
    assert out.shape == shape and out.dtype == torch.float32 and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name,params,shape,nbytes", [
    ("identity", {}, (256, 128), 4 * 32768),
    ("bf16", {}, (256, 128), 2 * 32768),
    ("fp16", {}, (97, 29), 2 * 2813),
    ("sign", dict(block=0), (256, 128), 4096 + 4),
    ("sign", dict(block=0, scale_dtype="f16"), (7,), 1 + 2),
    ("sign", dict(block=100), (50257,), 6283 + 503 * 4),
    ("sign", dict(block=100, scale_dtype="f16"), (256, 128), 4096 + 328 * 2),
    # 2 × 2 blocks of 64×64 = 4096 coefficients, 12-bit indices: ceil(8·32·12/8) + 8·32·2
    ("dct_topk", dict(k=32, chunk=64), (256, 128), 384 + 512),
    # 1-D, 3 chunks of 64 → 6-bit indices: ceil(3·32·6/8) = 72, values 3·32·2
    ("dct_topk", dict(k=32, chunk=64), (192,), 72 + 192),
    # 50257 → 1733 chunks of 29, 5-bit indices, k = 1
    ("dct_topk", dict(k=1, chunk=64), (50257,), math.ceil(1733 * 5 / 8) + 1733 * 2),
    ("dct_topk", dict(k=32, chunk=64, values="int8"), (256, 128), 384 + 256 + 8 * 4),
    ("dct_topk", dict(k=32, chunk=64, values="sign"), (256, 128), 384 + 32 + 8 * 4),
    ("dct_topk", dict(k=4096, chunk=64, values="f32"), (256, 128), 0 + 4 * 32768),  # k ≥ block: no indices
])
def test_byte_formula_examples(name: str, params: dict[str, Any], shape: tuple[int, ...], nbytes: int) -> None:
    codec = make_codec(name, params)
    assert codec.nbytes(shape) == nbytes
    enc = codec.encode(_x(shape))
    assert sum(b.numel() * b.element_size() for b in enc.values()) == nbytes


def test_dct_topk_omits_indices_exactly_when_everything_is_sent() -> None:
    shape = (96,)  # two blocks of 48
    assert make_codec("dct_topk", dict(k=48, chunk=64)).layout(shape)["indices"].numel == 0
    assert make_codec("dct_topk", dict(k=47, chunk=64)).layout(shape)["indices"].numel == math.ceil(2 * 47 * 6 / 8)


# -- determinism ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(), (7,), (256, 128), (3, 4, 5)], ids=str)
@pytest.mark.parametrize("name,params", SMALL_CONFIGS, ids=SMALL_IDS)
def test_encode_is_deterministic_and_pure(name: str, params: dict[str, Any], shape: tuple[int, ...]) -> None:
    codec = make_codec(name, params)
    x = _x(shape, seed=1)
    x_copy = x.clone()
    a, b = codec.encode(x), make_codec(name, params).encode(x.clone())
    assert torch.equal(x, x_copy)  # the input is not modified
    assert list(a) == list(b)
    for key in a:
        assert _raw(a[key]) == _raw(b[key]), key
    if len(shape) == 2:  # a non-contiguous view of the same values encodes to the same bytes
        c = codec.encode(x.t().contiguous().t())
        assert all(_raw(a[key]) == _raw(c[key]) for key in a)


@pytest.mark.parametrize("name,params", CONFIGS, ids=CONFIG_IDS)
def test_params_rebuild_the_same_codec(name: str, params: dict[str, Any]) -> None:
    codec = make_codec(name, params)
    again = make_codec(name, codec.params())
    assert again.params() == codec.params()
    assert type(again) is CODECS[name] and again.name == name
    assert codec.describe().startswith(f"{name}(")
    for key, value in params.items():
        assert codec.params()[key] == value


# -- reconstruction -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dense_reconstruction(shape: tuple[int, ...]) -> None:
    x = _x(shape, seed=2) * 10
    ident = make_codec("identity")
    assert torch.equal(ident.decode(ident.encode(x), shape), x)
    bf = make_codec("bf16")
    torch.testing.assert_close(bf.decode(bf.encode(x), shape), x, rtol=2 ** -8, atol=0)
    assert torch.equal(bf.decode(bf.encode(x), shape), x.to(torch.bfloat16).float())
    hf = make_codec("fp16")
    torch.testing.assert_close(hf.decode(hf.encode(x), shape), x, rtol=2 ** -11, atol=1e-7)
    assert torch.equal(hf.decode(hf.encode(x), shape), x.to(torch.float16).float())


def test_fp16_refuses_values_it_cannot_represent() -> None:
    with pytest.raises(ValueError, match="fp16"):
        make_codec("fp16").encode(torch.tensor([1.0, 1e5]))
    with pytest.raises(ValueError, match="identity"):
        make_codec("identity").encode(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("chunk", [64, 10])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dct_topk_lossless_when_k_covers_the_block(shape: tuple[int, ...], chunk: int) -> None:
    x = _x(shape, seed=3)
    codec = make_codec("dct_topk", dict(k=4096, chunk=chunk, values="f32"))
    assert codec.layout(shape)["indices"].numel == 0
    out = codec.decode(codec.encode(x), shape)
    assert float((out - x).norm()) <= 1e-5 * max(float(x.norm()), 1e-30)
    half = make_codec("dct_topk", dict(k=4096, chunk=chunk, values="f16"))
    out16 = half.decode(half.encode(x), shape)
    assert float((out16 - x).norm()) <= 2e-3 * float(x.norm())


@functools.lru_cache(maxsize=None)
def _ref_matrix(n: int) -> torch.Tensor:
    """C[k, j] = sqrt((1 if k == 0 else 2) / n) · cos(π (2j + 1) k / 2n), fp64."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    norm = torch.full((n, 1), math.sqrt(2 / n), dtype=torch.float64)
    norm[0] = math.sqrt(1 / n)
    return norm * torch.cos(math.pi * (2 * j + 1) * k / (2 * n))


def _ref_coeffs(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """Independent fp64 block DCT: (nb, bs), blocks row-major, each block flattened row-major."""
    shape = tuple(x.shape)
    rows, cols, br, bc = _blocks(shape, chunk)
    m = x.detach().double().reshape(rows, cols)

    cr, cc = _ref_matrix(br), _ref_matrix(bc)
    out = []
    for i in range(rows // br):
        for j in range(cols // bc):
            out.append((cr @ m[i * br:(i + 1) * br, j * bc:(j + 1) * bc] @ cc.T).reshape(-1))
    return torch.stack(out)


@pytest.mark.parametrize("k,chunk,shape", [(1, 64, (96,)), (5, 64, (192,)), (32, 64, (256, 128)),
                                           (7, 10, (3, 4, 5)), (3, 64, (97, 29)), (32, 10, (256, 128)),
                                           (64, 64, (50, 50))])
def test_dct_topk_keeps_exactly_the_k_largest_per_block(k: int, chunk: int, shape: tuple[int, ...]) -> None:
    x = _x(shape, seed=4)
    codec = make_codec("dct_topk", dict(k=k, chunk=chunk, values="f32"))
    enc = codec.encode(x)
    ref = _ref_coeffs(x, chunk)  # (nb, bs)
    nb, bs = ref.shape
    kept = min(k, bs)
    assert kept < bs  # this test is about selection
    want_idx = torch.sort(torch.topk(ref.abs(), kept, dim=1).indices, dim=1).values
    width = math.ceil(math.log2(bs))
    got_idx = unpack_uints(enc["indices"], nb * kept, width).view(nb, kept)
    assert torch.equal(got_idx, want_idx)
    torch.testing.assert_close(enc["values"].double().view(nb, kept), ref.gather(1, want_idx), atol=1e-5, rtol=1e-5)
    # the decoded tensor holds exactly those coefficients and nothing else
    masked = torch.zeros_like(ref).scatter_(1, want_idx, ref.gather(1, want_idx))
    decoded = codec.decode(enc, shape)
    torch.testing.assert_close(_ref_coeffs(decoded, chunk), masked, atol=1e-5, rtol=1e-5)


def test_dct_topk_int8_and_sign_value_formats() -> None:
    shape = (256, 128)
    x = _x(shape, seed=5)
    ref = _ref_coeffs(x, 64)  # (8, 4096)
    idx = torch.sort(torch.topk(ref.abs(), 32, dim=1).indices, dim=1).values
    vals = ref.gather(1, idx)  # (8, 32)

    int8 = make_codec("dct_topk", dict(k=32, values="int8"))
    enc = int8.encode(x)
    scale = vals.abs().amax(dim=1) / 127
    torch.testing.assert_close(enc["scales"].double(), scale, atol=1e-6, rtol=1e-5)
    q = enc["values"].view(torch.int8).long().view(8, 32)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert torch.equal(q, torch.round(vals / scale.unsqueeze(1)).long())
    got = _ref_coeffs(int8.decode(enc, shape), 64).gather(1, idx)
    assert bool(((got - vals).abs() <= scale.unsqueeze(1) / 2 + 1e-5).all())

    sgn = make_codec("dct_topk", dict(k=32, values="sign"))
    enc = sgn.encode(x)
    mean_abs = vals.abs().mean(dim=1)
    torch.testing.assert_close(enc["scales"].double(), mean_abs, atol=1e-6, rtol=1e-5)
    got = _ref_coeffs(sgn.decode(enc, shape), 64)
    expect = torch.zeros_like(ref).scatter_(1, idx, torch.where(vals >= 0, 1.0, -1.0).double() * mean_abs.unsqueeze(1))
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


def test_dct_topk_int8_all_zero_block() -> None:
    codec = make_codec("dct_topk", dict(k=4, values="int8"))
    enc = codec.encode(torch.zeros(64))
    codec.validate(enc, (64,))
    assert float(enc["scales"][0]) == 0.0
    assert torch.equal(codec.decode(enc, (64,)), torch.zeros(64))


# -- sign ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES + [(250,), (1000, 3)], ids=str)
@pytest.mark.parametrize("params", SIGN_PARAMS + [dict(block=8, scale_dtype="bf16")], ids=str)
def test_sign_decode_is_scale_times_sign(params: dict[str, Any], shape: tuple[int, ...]) -> None:
    codec = make_codec("sign", params)
    x = _x(shape, seed=6)
    if x.numel() > 2:
        x.view(-1)[1] = 0.0  # zero is sent as +1
        x.view(-1)[2] = -0.0
    enc = codec.encode(x)
    want, scales = _sign_expected(x, params["block"], params["scale_dtype"])
    torch.testing.assert_close(enc["scales"].float(), scales, rtol=1e-5, atol=0)
    out = codec.decode(enc, shape)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=0)
    if x.numel() > 2:
        assert float(out.view(-1)[1]) > 0 and float(out.view(-1)[2]) > 0


def test_sign_codec_packs_signs_lsb_first() -> None:
    codec = make_codec("sign")
    x = torch.tensor([1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -2.0, 3.0])
    enc = codec.encode(x)
    assert enc["bits"].tolist() == [1, 2]
    assert torch.equal(enc["bits"], pack_bools(x >= 0))
    torch.testing.assert_close(enc["scales"], torch.tensor([x.abs().mean()]))
