"""Every codec: exact layouts and byte formulas (oracle 12), determinism, reconstruction, reduce semantics
(sign mean/vote, DCT selector-mean — oracle 9), top-k selection, error feedback (oracles 4 and 10),
configuration errors and content validation."""
from __future__ import annotations

import functools
import itertools
import math
from typing import Any

import pytest
import torch

from node.compress import CODECS, DctTopKCodec, ErrorFeedback, NoFeedback, SignCodec, make_codec, make_feedback
from node.compress import dct
from node.compress.base import Codec, numel_of
from node.compress.bitpack import pack_bools, pack_uints, unpack_uints
from node.errors import ConfigError, PayloadError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: intra-op threads only contend (4× slower on a busy 2-core box); restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

SHAPES = [(), (1,), (7,), (96,), (256, 128), (3, 4, 5), (97, 29)]

SIGN_PARAMS = [dict(block=b, scale_dtype=s, reduce=r)
               for b, s, r in itertools.product([0, 100], ["f32", "f16"], ["mean", "vote"])]
DCT_PARAMS = [dict(k=k, chunk=c, values=v, reduce=r)
              for v, r, k, c in itertools.product(["f16", "bf16", "f32", "int8", "sign"], ["selector-mean", "mean"],
                                                  [1, 32, 4096], [64, 10])]
CONFIGS: list[tuple[str, dict[str, Any]]] = ([("identity", {}), ("bf16", {}), ("fp16", {})]
                                             + [("sign", p) for p in SIGN_PARAMS]
                                             + [("dct_topk", p) for p in DCT_PARAMS])
CONFIG_IDS = [f"{n}-" + "-".join(f"{v}" for v in p.values()) for n, p in CONFIGS]
# a smaller set for the more expensive checks: every value format and both reduces, fewer k/chunk combinations
SMALL_CONFIGS = [(n, p) for n, p in CONFIGS
                 if n != "dct_topk" or (p["k"], p["chunk"]) in ((32, 64), (1, 10), (4096, 64))]
SMALL_IDS = [f"{n}-" + "-".join(f"{v}" for v in p.values()) for n, p in SMALL_CONFIGS]

_SCALE_ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}
_SCALE_DTYPE = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _x(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 7919 + sum(shape) + 31 * len(shape))
    return torch.randn(shape, generator=g)


def _raw(buf: torch.Tensor) -> bytes:
    return buf.contiguous().view(torch.uint8).numpy().tobytes()


def _largest_divisor(d: int, target: int) -> int:
    return max(c for c in range(1, min(d, target) + 1) if d % c == 0)


def _blocks(shape: tuple[int, ...], chunk: int) -> tuple[int, int, int, int]:
    """Independent block plan: (rows, cols, br, bc)."""
    n = numel_of(shape)
    rows, cols = (1, n) if len(shape) <= 1 else (shape[0], n // shape[0])
    return rows, cols, _largest_divisor(rows, chunk), _largest_divisor(cols, chunk)


def expected_nbytes(name: str, params: dict[str, Any], shape: tuple[int, ...]) -> int:
    """The byte formulas of spec §4/§5 and the codec docs, computed without the codec."""
    n = numel_of(shape)
    if name == "identity":
        return 4 * n
    if name in ("bf16", "fp16"):
        return 2 * n
    if name == "sign":
        chunks = 0 if n == 0 else (1 if params["block"] == 0 else math.ceil(n / params["block"]))
        return math.ceil(n / 8) + chunks * _SCALE_ITEMSIZE[params["scale_dtype"]]
    assert name == "dct_topk"
    rows, cols, br, bc = _blocks(shape, params["chunk"])
    bs = br * bc
    nb = n // bs
    k = min(params["k"], bs)
    width = 0 if k == bs else math.ceil(math.log2(bs))
    indices = math.ceil(nb * k * width / 8)
    values = {"f16": 2 * nb * k, "bf16": 2 * nb * k, "f32": 4 * nb * k,
              "int8": nb * k + 4 * nb, "sign": math.ceil(nb * k / 8) + 4 * nb}[params["values"]]
    return indices + values


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

def _sign_expected(x: torch.Tensor, block: int, scale_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoded tensor, per-chunk scales as sent) computed chunk by chunk in Python."""
    flat = x.reshape(-1)
    n = flat.numel()
    size = n if block == 0 else block
    scales, out = [], []
    for start in range(0, n, max(size, 1)):
        part = flat[start:start + size]
        s = torch.tensor(float(part.abs().double().mean())).to(_SCALE_DTYPE[scale_dtype]).float()
        scales.append(s)
        out.append(torch.where(part >= 0, s, -s))
    return torch.cat(out).reshape(x.shape), torch.stack(scales)


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


@pytest.mark.parametrize("block", [0, 100])
def test_sign_reduce_mean_is_mean_of_decodes(block: int) -> None:
    shape = (256, 128)
    codec = make_codec("sign", dict(block=block, reduce="mean"))
    encs = [codec.encode(_x(shape, seed=s) * (s + 1)) for s in range(3)]
    want = sum(codec.decode(e, shape) for e in encs) / 3
    torch.testing.assert_close(codec.reduce(encs, shape), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("block", [0, 100])
@pytest.mark.parametrize("scale_dtype", ["f32", "f16"])
def test_sign_reduce_vote(block: int, scale_dtype: str) -> None:
    shape = (97, 29)
    codec = make_codec("sign", dict(block=block, scale_dtype=scale_dtype, reduce="vote"))
    xs = [_x(shape, seed=s) * (s + 1) for s in range(3)]
    encs = [codec.encode(x) for x in xs]
    signs = [torch.where(x >= 0, 1.0, -1.0) for x in xs]
    majority = torch.sign(sum(signs))
    scales = [_sign_expected(x, block, scale_dtype)[0].abs() for x in xs]  # per-element scale of each worker
    want = majority * (sum(scales) / 3)
    out = codec.reduce(encs, shape)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-7)
    assert bool((out != 0).all())  # three voters never tie


def test_sign_vote_ties_give_zero_and_mean_differs() -> None:
    shape = (64,)
    x = _x(shape, seed=7)
    x[x == 0] = 1.0
    vote = make_codec("sign", dict(reduce="vote"))
    out = vote.reduce([vote.encode(x), vote.encode(-x)], shape)
    assert torch.equal(out, torch.zeros(shape))
    # two of three agree: the majority sign with the mean of all three scales
    y = x.abs() * 3
    out3 = vote.reduce([vote.encode(x), vote.encode(-x), vote.encode(y)], shape)
    mean_scale = (2 * x.abs().mean() + y.abs().mean()) / 3
    torch.testing.assert_close(out3, torch.full(shape, float(mean_scale)), rtol=1e-6, atol=0)
    # 'mean' instead: x and −x cancel exactly, leaving y's scale over three workers
    mean = make_codec("sign", dict(reduce="mean"))
    m = mean.reduce([mean.encode(x), mean.encode(-x), mean.encode(y)], shape)
    torch.testing.assert_close(m, torch.full(shape, float(y.mean()) / 3), rtol=1e-6, atol=1e-7)


# -- reduce: single payload and selector-mean (oracle 9) ---------------------------------------------

@pytest.mark.parametrize("name,params", SMALL_CONFIGS, ids=SMALL_IDS)
def test_reduce_of_one_payload_is_its_decode(name: str, params: dict[str, Any]) -> None:
    shape = (97, 29)
    codec = make_codec(name, params)
    enc = codec.encode(_x(shape, seed=8))
    torch.testing.assert_close(codec.reduce([enc], shape), codec.decode(enc, shape), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError):
        codec.reduce([], shape)


def _spiky(coeffs: dict[int, float], n: int = 64) -> torch.Tensor:
    """A 1-D tensor whose DCT (one chunk of n) is exactly these coefficients."""
    c = torch.zeros(1, n, dtype=torch.float64)
    for i, v in coeffs.items():
        c[0, i] = v
    return dct.inverse(c, dct.plan_blocks((n,), 64)).float()


@pytest.mark.parametrize("values", ["f32", "f16", "bf16"])
def test_selector_mean_single_picker_keeps_its_value(values: str) -> None:
    shape = (64,)
    plan = dct.plan_blocks(shape, 64)
    a = _spiky({3: 5.0, 10: -4.0})
    b = _spiky({3: 1.0, 20: 2.0})
    sel = make_codec("dct_topk", dict(k=2, values=values, reduce="selector-mean"))
    ea, eb = sel.encode(a), sel.encode(b)
    assert unpack_uints(ea["indices"], 2, 6).tolist() == [3, 10]
    assert unpack_uints(eb["indices"], 2, 6).tolist() == [3, 20]
    tol = dict(atol=1e-4, rtol=1e-2 if values == "bf16" else 1e-3)
    q = dct.forward(sel.reduce([ea, eb], shape), plan)[0]
    torch.testing.assert_close(q[10], torch.tensor(-4.0), **tol)  # picked by a only: a's value, not half
    torch.testing.assert_close(q[20], torch.tensor(2.0), **tol)   # picked by b only
    torch.testing.assert_close(q[3], torch.tensor(3.0), **tol)    # picked by both: their mean
    others = torch.ones(64, dtype=torch.bool)
    others[[3, 10, 20]] = False
    assert float(q[others].abs().max()) < 1e-4
    # the order of payloads does not change the result
    torch.testing.assert_close(sel.reduce([eb, ea], shape), sel.reduce([ea, eb], shape), atol=1e-6, rtol=0)

    mean = make_codec("dct_topk", dict(k=2, values=values, reduce="mean"))
    qm = dct.forward(mean.reduce([mean.encode(a), mean.encode(b)], shape), plan)[0]
    torch.testing.assert_close(qm[10], torch.tensor(-2.0), **tol)  # divided by all workers
    torch.testing.assert_close(qm[20], torch.tensor(1.0), **tol)
    torch.testing.assert_close(qm[3], torch.tensor(3.0), **tol)


def test_selector_mean_with_handcrafted_2d_payloads() -> None:
    shape = (8, 8)  # one 8×8 block: 64 coefficients, 6-bit indices
    plan = dct.plan_blocks(shape, 8)
    codec = make_codec("dct_topk", dict(k=2, chunk=8, values="f32", reduce="selector-mean"))

    def payload(idx: list[int], vals: list[float]) -> dict[str, torch.Tensor]:
        enc = {"indices": pack_uints(torch.tensor(idx), 6), "values": torch.tensor(vals, dtype=torch.float32)}
        codec.validate(enc, shape)
        return enc

    p1, p2, p3 = payload([1, 9], [2.0, 3.0]), payload([9, 40], [5.0, -1.0]), payload([9, 63], [7.0, 0.5])
    q = dct.forward(codec.reduce([p1, p2, p3], shape), plan).view(-1)
    expect = torch.zeros(64)
    expect[1], expect[9], expect[40], expect[63] = 2.0, 5.0, -1.0, 0.5
    torch.testing.assert_close(q, expect, atol=1e-5, rtol=0)
    q2 = dct.forward(codec.reduce([p1, p2], shape), plan).view(-1)
    expect2 = torch.zeros(64)
    expect2[1], expect2[9], expect2[40] = 2.0, 4.0, -1.0
    torch.testing.assert_close(q2, expect2, atol=1e-5, rtol=0)
    # 'mean' divides every coefficient by the number of workers
    mean = make_codec("dct_topk", dict(k=2, chunk=8, values="f32", reduce="mean"))
    qm = dct.forward(mean.reduce([p1, p2, p3], shape), plan).view(-1)
    torch.testing.assert_close(qm, torch.zeros(64).index_put_(
        (torch.tensor([1, 9, 40, 63]),), torch.tensor([2.0, 15.0, -1.0, 0.5]) / 3), atol=1e-5, rtol=0)


def test_selector_mean_equals_mean_when_everything_is_sent() -> None:
    shape = (96, 16)
    sel = make_codec("dct_topk", dict(k=4096, values="f32", reduce="selector-mean"))
    mean = make_codec("dct_topk", dict(k=4096, values="f32", reduce="mean"))
    xs = [_x(shape, seed=s) for s in range(3)]
    want = sum(xs) / 3
    torch.testing.assert_close(sel.reduce([sel.encode(x) for x in xs], shape), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean.reduce([mean.encode(x) for x in xs], shape), want, atol=1e-5, rtol=1e-5)


# -- error feedback (oracles 4 and 10) -------------------------------------------------------------------

FEEDBACK_CODECS = [("sign", dict(block=0)), ("sign", dict(block=100, scale_dtype="f16")),
                   ("dct_topk", dict(k=4, chunk=64, values="f32")), ("dct_topk", dict(k=32, values="f16")),
                   ("dct_topk", dict(k=8, values="int8")), ("dct_topk", dict(k=8, values="sign"))]


@pytest.mark.parametrize("name,params", FEEDBACK_CODECS, ids=str)
def test_error_feedback_conserves_everything(name: str, params: dict[str, Any]) -> None:
    shape = (96, 16)
    codec = make_codec(name, params)
    ef = ErrorFeedback(1.0)
    sent_total = torch.zeros(shape)
    x_total = torch.zeros(shape)
    for t in range(5):
        x = _x(shape, seed=10 + t)
        u = ef.compensate("w", x)
        sent = codec.decode(codec.encode(u), shape)
        ef.commit("w", u, sent)
        sent_total += sent
        x_total += x
        assert not torch.equal(ef.residuals["w"], torch.zeros(shape))  # the codec is lossy here
    torch.testing.assert_close(sent_total + ef.residuals["w"], x_total, atol=1e-5, rtol=0)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.95])
@pytest.mark.parametrize("name,params", FEEDBACK_CODECS[:3], ids=str)
def test_error_feedback_with_decay(name: str, params: dict[str, Any], beta: float) -> None:
    shape = (64, 8)
    codec = make_codec(name, params)
    ef = ErrorFeedback(beta)
    e_before = torch.zeros(shape)
    for t in range(4):
        x = _x(shape, seed=20 + t)
        u = ef.compensate("w", x)
        torch.testing.assert_close(u, beta * e_before + x, atol=1e-6, rtol=0)
        sent = codec.decode(codec.encode(u), shape)
        ef.commit("w", u, sent)
        e_after = ef.residuals["w"]
        torch.testing.assert_close(e_after + sent, beta * e_before + x, atol=1e-5, rtol=0)
        e_before = e_after.clone()


def test_compensate_does_not_alias_state() -> None:
    ef = ErrorFeedback(0.5)
    x = torch.ones(4)
    u = ef.compensate("a", x)
    u.add_(1.0)
    assert torch.equal(x, torch.ones(4))  # first round: u is a copy of x
    ef.commit("a", u, torch.zeros(4))
    residual = ef.residuals["a"].clone()
    u2 = ef.compensate("a", x)
    assert torch.equal(ef.residuals["a"], residual)  # compensate leaves the residual alone
    torch.testing.assert_close(u2, 0.5 * residual + x)
    assert "b" not in ef.residuals and torch.equal(ef.compensate("b", x), x)  # tensors are independent


def test_keep_retains_all_of_u() -> None:
    ef = ErrorFeedback(0.9)
    u = torch.arange(6, dtype=torch.float32)
    ef.keep("w", u)
    u.mul_(0)  # the kept copy is independent of the caller's tensor
    assert torch.equal(ef.residuals["w"], torch.arange(6, dtype=torch.float32))
    x = torch.ones(6)
    torch.testing.assert_close(ef.compensate("w", x), 0.9 * torch.arange(6, dtype=torch.float32) + x)
    # a missed round followed by a transmitted one still conserves with decay 1
    ef1 = ErrorFeedback(1.0)
    codec = make_codec("sign")
    x1, x2 = _x((32,), seed=1), _x((32,), seed=2)
    u1 = ef1.compensate("w", x1)
    ef1.keep("w", u1)
    u2 = ef1.compensate("w", x2)
    sent = codec.decode(codec.encode(u2), (32,))
    ef1.commit("w", u2, sent)
    torch.testing.assert_close(sent + ef1.residuals["w"], x1 + x2, atol=1e-6, rtol=0)


def test_no_feedback_keeps_nothing() -> None:
    nf = NoFeedback()
    codec = make_codec("sign")
    x = _x((32,), seed=3)
    for _ in range(3):
        u = nf.compensate("w", x)
        assert torch.equal(u, x)
        nf.commit("w", u, codec.decode(codec.encode(u), (32,)))
        nf.keep("w", u)
    assert nf.residuals == {} and nf.state_dict() == {}


def test_feedback_state_dict_round_trip_and_factory() -> None:
    ef = ErrorFeedback(1.0)
    ef.commit("a", torch.ones(3), torch.zeros(3))
    state = ef.state_dict()
    state["a"].zero_()  # a copy
    assert torch.equal(ef.residuals["a"], torch.ones(3))
    other = ErrorFeedback(1.0)
    other.load_state_dict(ef.state_dict())
    assert torch.equal(other.residuals["a"], torch.ones(3))
    assert isinstance(make_feedback(None), NoFeedback)
    fb = make_feedback(0.9)
    assert type(fb) is ErrorFeedback and fb.decay == 0.9
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="decay"):
            ErrorFeedback(bad)


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
    assert set(CODECS) == {"identity", "bf16", "fp16", "sign", "dct_topk"}
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


def test_sign_codec_packs_signs_lsb_first() -> None:
    codec = make_codec("sign")
    x = torch.tensor([1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -2.0, 3.0])
    enc = codec.encode(x)
    assert enc["bits"].tolist() == [1, 2]
    assert torch.equal(enc["bits"], pack_bools(x >= 0))
    torch.testing.assert_close(enc["scales"], torch.tensor([x.abs().mean()]))
