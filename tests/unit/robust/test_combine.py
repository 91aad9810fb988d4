"""Robust combinations (node/robust/combine.py, SignCodec.vote, DctTopKCodec.clipped_selector_mean) and the codecs'
``norm`` and ``scaled``, against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from node.compress import dct, make_codec
from node.compress.base import median0
from node.config import ReduceConfig
from node.robust.combine import combine, trim_count, trimmed_mean

IDENTITY = make_codec("identity")


def _dense(*values: float) -> dict[str, torch.Tensor]:
    return {"values": torch.tensor(values, dtype=torch.float32)}


def test_trim_count_cuts_a_quarter_but_always_keeps_one() -> None:
    assert [trim_count(n, 0.25) for n in (1, 2, 3, 4, 5, 8, 9)] == [0, 0, 0, 1, 1, 2, 2]
    assert trim_count(3, 0.45) == 1 and trim_count(2, 0.45) == 0


def test_trimmed_mean_drops_the_extremes_of_each_coordinate() -> None:
    # coordinate 0: 1 2 3 4 100 → drop 1 and 100 → (2 + 3 + 4) / 3 = 3; coordinate 1: −50 0 1 1 1 → (0 + 1 + 1) / 3
    encs = [_dense(1, 1), _dense(2, -50), _dense(3, 1), _dense(4, 0), _dense(100, 1)]
    out = combine(IDENTITY, encs, (2,), ReduceConfig(robust="trimmed_mean", trim=0.25))
    assert out.tolist() == pytest.approx([3.0, 2 / 3])
    assert trimmed_mean(torch.tensor([[1.0], [5.0]]), 0.25).tolist() == [3.0]  # n = 2: nothing cut


def test_median_per_coordinate_odd_and_even() -> None:
    encs = [_dense(1, 9), _dense(7, 2), _dense(3, 4)]
    assert combine(IDENTITY, encs, (2,), ReduceConfig(robust="median")).tolist() == [3.0, 4.0]
    encs.append(_dense(100, 3))  # even: the mean of the two middle values: (3 + 7) / 2, (3 + 4) / 2
    assert combine(IDENTITY, encs, (2,), ReduceConfig(robust="median")).tolist() == [5.0, 3.5]
    assert median0(torch.tensor([[2.0], [1.0]])).tolist() == [1.5]


def test_none_is_the_codecs_own_reduce() -> None:
    encs = [_dense(1, 2), _dense(3, 10)]
    assert torch.equal(combine(IDENTITY, encs, (2,), ReduceConfig()), IDENTITY.reduce(encs, (2,)))


def test_vote_takes_the_majority_sign_and_the_mean_scale() -> None:
    codec = make_codec("sign")  # its own reduce is the mean; robust vote overrides that
    xs = [torch.tensor([1.0, -1.0, 2.0, -2.0]), torch.tensor([1.0, 1.0, -2.0, -2.0]),
          torch.tensor([3.0, 3.0, -3.0, 3.0])]  # scales 1.5, 1.5, 3 → mean 2
    encs = [codec.encode(x) for x in xs]
    out = combine(codec, encs, (4,), ReduceConfig(bound="clip", robust="vote"))
    assert out.tolist() == [2.0, 2.0, -2.0, -2.0]  # votes +3, +1, −1, −1


def test_clipped_selector_mean_cuts_a_lone_large_value_to_the_typical_peak() -> None:
    # 1-D tensor of 4 elements = one DCT block of 4 coefficients; k = 2 of them per sender
    codec = make_codec("dct_topk", {"k": 2, "chunk": 4, "values": "f32", "reduce": "selector-mean"})
    plan = dct.plan_blocks((4,), 4)

    def enc(coeffs: list[float]) -> dict[str, torch.Tensor]:
        return codec.encode(dct.inverse(torch.tensor([coeffs], dtype=torch.float32), plan).reshape(4))

    # coefficient space: A picks c0 = 4, c1 = 2; B picks c0 = 6, c2 = 1; C picks c0 = 5, c3 = 100 (the attacker)
    encs = [enc([4, 2, 0, 0]), enc([6, 0, 1, 0]), enc([5, 0, 0, 100])]
    # block peaks 4, 6, 100 → median 6 → every value clipped to ±2·6 = 12: C's 100 becomes 12; each sum is then
    # divided by max(picks, ⌈3/2⌉ = 2): a coefficient one sender chose counts half
    got = dct.forward(combine(codec, encs, (4,), ReduceConfig(bound="clip", bound_ratio=2.0,
                                                              robust="clipped_selector_mean")).reshape(1, 4), plan)
    assert got.reshape(-1).tolist() == pytest.approx([5.0, 1.0, 0.5, 6.0], abs=1e-4)  # c0: (4+6+5)/3
    plain = dct.forward(codec.reduce(encs, (4,)).reshape(1, 4), plan)  # selector-mean keeps the 100
    assert plain.reshape(-1).tolist() == pytest.approx([5.0, 2.0, 1.0, 100.0], abs=1e-4)


CODECS = [("identity", {}), ("bf16", {}), ("fp16", {}), ("sign", {}), ("sign", {"block": 7, "scale_dtype": "f16"}),
          ("dct_topk", {}), ("dct_topk", {"k": 4, "chunk": 10, "values": "int8"}),
          ("dct_topk", {"k": 4, "chunk": 10, "values": "sign"}), ("dct_topk", {"k": 4096, "values": "f32"}),
          ("sparse_topk", {"k": 5, "chunk": 16})]


@pytest.mark.parametrize("name,params", CODECS, ids=[f"{n}-{p}" for n, p in CODECS])
def test_norm_is_the_decoded_norm_and_scaled_decodes_to_the_scaled_tensor(name: str, params: dict) -> None:
    codec = make_codec(name, params)
    x = torch.randn(48, 16, generator=torch.Generator().manual_seed(3))
    enc = codec.encode(codec.fit(x))
    decoded = codec.decode(enc, (48, 16))
    assert codec.norm(enc, (48, 16)) == pytest.approx(float(decoded.double().norm()), rel=1e-6)
    scaled = codec.scaled(enc, (48, 16), 0.25)
    assert torch.allclose(codec.decode(scaled, (48, 16)), 0.25 * decoded, rtol=1e-6, atol=1e-7)
    assert codec.scaled(enc, (48, 16), 1.0) is enc
    assert all(torch.equal(enc[k], v) for k, v in codec.encode(codec.fit(x)).items())  # enc itself untouched


def test_norms_by_hand() -> None:
    assert IDENTITY.norm(_dense(3, 4), (2,)) == 5.0
    sign = make_codec("sign", {"block": 3})  # chunks of 3, 3, 1 elements with scales 2, 1, 4
    enc = {"bits": torch.tensor([0b1111111], dtype=torch.uint8), "scales": torch.tensor([2.0, 1.0, 4.0])}
    assert sign.norm(enc, (7,)) == pytest.approx(math.sqrt(4 * 3 + 1 * 3 + 16 * 1))
    assert sign.scaled(enc, (7,), 0.5)["scales"].tolist() == [1.0, 0.5, 2.0]
    assert sign.scaled(enc, (7,), 0.5)["bits"] is enc["bits"]


@pytest.mark.parametrize("n", [1, 2, 3, 8, 16, 17])
def test_sorted0_is_torch_sort_for_any_number_of_rows(n: int) -> None:
    from node.compress.base import sorted0

    x = torch.randn(n, 5, 3, generator=torch.Generator().manual_seed(n))
    x[0, 0, 0] = x[-1, 0, 0]  # a tie
    assert torch.equal(sorted0(x), x.sort(dim=0).values)


@pytest.mark.parametrize("name,params", CODECS, ids=[f"{n}-{p}" for n, p in CODECS])
def test_dots_are_the_decoded_inner_products(name: str, params: dict) -> None:
    codec = make_codec(name, params)
    g = torch.Generator().manual_seed(4)
    encs = [codec.encode(codec.fit(torch.randn(48, 16, generator=g))) for _ in range(3)]
    other = torch.randn(48, 16, generator=g)
    want = [float((codec.decode(e, (48, 16)).double() * other.double()).sum()) for e in encs]
    assert codec.dots(encs, (48, 16), other) == pytest.approx(want, rel=1e-5, abs=1e-5)
