"""The SparseLoCo payload (chunked top-k, statistically quantized values) against an independent derivation in numpy:
which entries are kept, what each decodes to, the exact byte formula, both reduce rules, and refusal of malformed
buffers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from node import wire
from node.compress import make_codec
from node.compress.bitpack import pack_uints
from node.errors import PayloadError


def oracle(x: np.ndarray, k: int, chunk: int, bits: int, range_sigmas: float) -> np.ndarray:
    """The decoded tensor, derived directly from the paper's description: per chunk the k largest |x|, the kept values
    centred on their mean, binned in steps of range·σ / 2^bits around the middle bin, each replaced by its bin's mean."""
    flat = x.astype(np.float64).reshape(-1)
    kept = []
    for start in range(0, flat.size, chunk):
        part = np.abs(flat[start:start + chunk])
        order = np.argsort(-part, kind="stable")[:min(k, part.size)]
        kept.extend(sorted(start + order))
    kept_idx = np.array(kept, dtype=np.int64)
    v = flat[kept_idx]
    out = np.zeros(flat.size)
    if v.size == 0:
        return out.reshape(x.shape)
    shift = v.mean()
    c = v - shift
    sigma = math.sqrt((c ** 2).sum() / max(1, c.size - 1))
    bins = 2 ** bits
    step = range_sigmas * sigma / bins if sigma > 0 else 1.0
    codes = np.clip(np.round(c / step + bins // 2), 0, bins - 1).astype(np.int64)
    levels = np.array([c[codes == b].mean() if (codes == b).any() else 0.0 for b in range(bins)])
    out[kept_idx] = levels[codes] + shift
    return out.reshape(x.shape)


@pytest.mark.parametrize("shape,k,chunk", [((40,), 5, 16), ((6, 7), 3, 8), ((5,), 8, 16), ((33, 17), 4, 64),
                                           ((64,), 64, 16), ((3, 3), 1, 9)])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_decode_matches_the_derivation(shape: tuple[int, ...], k: int, chunk: int, bits: int) -> None:
    gen = torch.Generator().manual_seed(sum(shape) + k + bits)
    x = torch.randn(shape, generator=gen) * torch.logspace(-3, 1, int(np.prod(shape))).reshape(shape)
    codec = make_codec("sparse_topk", {"k": k, "chunk": chunk, "bits": bits, "range_sigmas": 6.0})
    enc = codec.encode(x)
    got = codec.decode(enc, shape).numpy()
    np.testing.assert_allclose(got, oracle(x.numpy(), k, chunk, bits, 6.0), rtol=1e-5, atol=1e-6)
    assert {name: buf.numel() for name, buf in enc.items()} == {n: s.numel for n, s in codec.layout(shape).items()}


def test_the_byte_formula_is_exact() -> None:
    """N = 9216 (a 96×96 matrix), chunk 4096, k 64: 2 full chunks and one of 1024, 192 kept entries at 12 bits of
    index and 2 bits of code, 4 f32 levels and one f32 shift."""
    codec = make_codec("sparse_topk", {"k": 64, "chunk": 4096, "bits": 2})
    assert codec.nbytes((96, 96)) == math.ceil(192 * 12 / 8) + math.ceil(192 * 2 / 8) + 4 * 4 + 4
    assert codec.density == 64 / 4096
    # every entry kept: no index buffer at all
    assert codec.layout((10,))["indices"].numel == 0


def test_reduce_mean_divides_by_every_worker_and_selector_mean_by_those_that_kept_an_entry() -> None:
    x = torch.tensor([4.0, 0.0, 0.0, 1.0])
    y = torch.tensor([0.0, 0.0, -2.0, 3.0])
    for mode, expect in (("mean", [2.0, 0.0, -1.0, 2.0]), ("selector-mean", [4.0, 0.0, -2.0, 2.0])):
        codec = make_codec("sparse_topk", {"k": 2, "chunk": 4, "bits": 8, "reduce": mode})
        dx, dy = codec.decode(codec.encode(x), (4,)), codec.decode(codec.encode(y), (4,))
        out = codec.reduce([codec.encode(x), codec.encode(y)], (4,))
        kept = (dx != 0).float() + (dy != 0).float()
        want = (dx + dy) / (2 if mode == "mean" else kept.clamp_min(1))
        torch.testing.assert_close(out, want)
        assert torch.allclose(out, torch.tensor(expect), atol=0.05), (mode, out)  # 8 bits: close to the input


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 40), chunk=st.integers(1, 64), scale=st.floats(1e-30, 1e20),
       seed=st.integers(0, 2 ** 16))
def test_any_size_and_magnitude_round_trips_finite_through_the_wire(n: int, k: int, chunk: int, scale: float,
                                                                    seed: int) -> None:
    codec = make_codec("sparse_topk", {"k": k, "chunk": chunk})
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    spec = wire.model_spec([("w", x)])
    frame = wire.pack("run", 0, "a", codec, spec, {"w": codec.encode(x)})
    env = wire.unpack(frame, codec, spec, "run", 0)
    out = codec.decode(env.tensors["w"], (n,))
    assert bool(torch.isfinite(out).all())
    assert int((out != 0).sum()) <= n


def test_indices_that_leave_their_chunk_or_repeat_are_refused() -> None:
    codec = make_codec("sparse_topk", {"k": 2, "chunk": 6})  # 3-bit indices can say 6 and 7: past a 6-entry chunk
    enc = codec.encode(torch.arange(12, dtype=torch.float32))
    with pytest.raises(PayloadError, match="past the end of its chunk"):
        codec.validate(dict(enc, indices=pack_uints(torch.tensor([1, 7, 2, 4]), 3)), (12,))
    codec = make_codec("sparse_topk", {"k": 2, "chunk": 8})
    enc = codec.encode(torch.arange(16, dtype=torch.float32))
    repeated = dict(enc, indices=pack_uints(torch.tensor([3, 3, 1, 5]), 3))
    with pytest.raises(PayloadError, match="not strictly ascending"):
        codec.validate(repeated, (16,))
    short = make_codec("sparse_topk", {"k": 2, "chunk": 8})
    tail = dict(short.encode(torch.arange(12, dtype=torch.float32)), indices=pack_uints(torch.tensor([1, 2, 0, 5]), 3))
    with pytest.raises(PayloadError, match="past the end of its chunk"):
        short.validate(tail, (12,))  # the last chunk holds 4 entries: index 5 is outside it
