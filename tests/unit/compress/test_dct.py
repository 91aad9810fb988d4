"""Chunked DCT (docs/algorithms.md, §5; oracle 11 of §8): chunk lengths, the orthonormal matrix, round trip
and Parseval."""
from __future__ import annotations

import math

import pytest
import torch

from node.compress import dct


def _dct_fft(x: torch.Tensor) -> torch.Tensor:
    """Independent orthonormal DCT-II along the last axis via an FFT (Makhoul's reordering), fp64."""
    n = x.shape[-1]
    v = torch.cat([x[..., 0::2], x[..., 1::2].flip(-1)], dim=-1).to(torch.float64)
    spec = torch.fft.fft(v, dim=-1)
    k = torch.arange(n, dtype=torch.float64)
    y = 2 * (spec * torch.exp(-1j * math.pi * k / (2 * n))).real
    scale = torch.full((n,), math.sqrt(1 / (2 * n)), dtype=torch.float64)
    scale[0] = math.sqrt(1 / (4 * n))
    return y * scale


def _dct_naive(x: list[float]) -> list[float]:
    """The textbook sum, in plain Python."""
    n = len(x)
    out = []
    for k in range(n):
        ck = math.sqrt(1 / n) if k == 0 else math.sqrt(2 / n)
        out.append(ck * sum(x[j] * math.cos(math.pi * (2 * j + 1) * k / (2 * n)) for j in range(n)))
    return out


@pytest.mark.parametrize("d,target,expected", [
    (50257, 64, 29), (96, 64, 48), (10, 64, 10), (64, 64, 64), (4096, 64, 64), (128, 64, 64),
    (67, 64, 1), (50261, 64, 1), (1, 64, 1), (100, 10, 10), (97, 10, 1), (256, 10, 8), (12, 5, 4),
])
def test_chunk_length_examples(d: int, target: int, expected: int) -> None:
    c = dct.chunk_length(d, target)
    assert c == expected
    assert d % c == 0 and c <= target
    assert not any(d % c2 == 0 for c2 in range(c + 1, min(d, target) + 1))  # largest such divisor


@pytest.mark.parametrize("d,target", [(0, 64), (10, 0), (-3, 5)])
def test_chunk_length_rejects_nonpositive(d: int, target: int) -> None:
    with pytest.raises(ValueError):
        dct.chunk_length(d, target)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 29, 48, 64])
def test_dct_matrix_orthonormal_with_dc_row(n: int) -> None:
    c = dct.dct_matrix(n, dtype=torch.float64)
    assert c.shape == (n, n)
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(c @ c.T, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(c.T @ c, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(c[0], torch.full((n,), 1 / math.sqrt(n), dtype=torch.float64), atol=1e-15, rtol=0)


def test_dct_matrix_matches_textbook_sum() -> None:
    n = 10
    c = dct.dct_matrix(n, dtype=torch.float64)
    for j in range(n):
        e = [0.0] * n
        e[j] = 1.0
        torch.testing.assert_close(c[:, j], torch.tensor(_dct_naive(e), dtype=torch.float64), atol=1e-12, rtol=0)


def test_dct_matrix_dtype_and_cache() -> None:
    c32 = dct.dct_matrix(8)
    assert c32.dtype == torch.float32
    torch.testing.assert_close(c32.double(), dct.dct_matrix(8, dtype=torch.float64), atol=1e-7, rtol=0)


@pytest.mark.parametrize("shape,target,block", [
    ((64 * 3,), 64, (1, 64)),
    ((50257,), 64, (1, 29)),
    ((10,), 64, (1, 10)),
    ((67,), 64, (1, 1)),
    ((), 64, (1, 1)),
    ((128, 96), 64, (64, 48)),
    ((58, 20), 29, (29, 20)),
    ((67, 10), 64, (1, 10)),
    ((3, 4, 5), 64, (3, 20)),
    ((6, 4, 5), 4, (3, 4)),
])
def test_round_trip_and_parseval_fp64(shape: tuple[int, ...], target: int, block: tuple[int, int]) -> None:
    plan = dct.plan_blocks(shape, target)
    assert (plan.br, plan.bc) == block
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    coeffs = dct.forward(x, plan)
    assert coeffs.dtype == torch.float64
    assert coeffs.shape == (plan.nblocks, plan.block_size)
    assert plan.nblocks * plan.block_size == x.numel()
    back = dct.inverse(coeffs, plan)
    assert back.shape == x.shape
    torch.testing.assert_close(back, x, atol=1e-12, rtol=0)
    # Parseval, globally and per block
    torch.testing.assert_close(coeffs.square().sum(), x.square().sum(), atol=1e-9, rtol=1e-12)


def test_parseval_per_block() -> None:
    plan = dct.plan_blocks((128, 96), 64)
    x = torch.randn(128, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    coeffs = dct.forward(x, plan)
    blocks = x.reshape(2, 64, 2, 48).permute(0, 2, 1, 3).reshape(4, -1)
    torch.testing.assert_close(coeffs.square().sum(1), blocks.square().sum(1), atol=1e-10, rtol=1e-12)


@pytest.mark.parametrize("n,target", [(192, 64), (50257, 64), (10, 64), (30, 10)])
def test_forward_1d_equals_chunks_times_ct(n: int, target: int) -> None:
    x = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    plan = dct.plan_blocks((n,), target)
    c = plan.bc
    chunks = x.view(n // c, c)
    expected = _dct_fft(chunks)  # row-wise DCT = chunks @ Cᵀ
    torch.testing.assert_close(dct.forward(x, plan), expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(expected, chunks @ dct.dct_matrix(c, dtype=torch.float64).T, atol=1e-10, rtol=0)
    # the inverse is X @ C
    torch.testing.assert_close(dct.inverse(expected, plan), x, atol=1e-10, rtol=0)


def test_forward_2d_blocks_match_separable_dct() -> None:
    x = torch.randn(12, 15, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    plan = dct.plan_blocks((12, 15), 5)
    assert (plan.br, plan.bc) == (4, 5)
    coeffs = dct.forward(x, plan)
    rows = []
    for bi in range(3):
        for bj in range(3):
            b = x[bi * 4:(bi + 1) * 4, bj * 5:(bj + 1) * 5]
            # 2-D DCT = DCT along columns of each row, then along rows of each column
            rows.append(_dct_fft(_dct_fft(b).T).T.reshape(-1))
    torch.testing.assert_close(coeffs, torch.stack(rows), atol=1e-12, rtol=0)


def test_more_than_two_dims_viewed_as_first_dim_by_rest() -> None:
    x = torch.randn(6, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    plan = dct.plan_blocks(x.shape, 64)
    assert (plan.rows, plan.cols) == (6, 20)
    flat_plan = dct.plan_blocks((6, 20), 64)
    torch.testing.assert_close(dct.forward(x, plan), dct.forward(x.reshape(6, 20), flat_plan), atol=0, rtol=0)
    assert dct.inverse(dct.forward(x, plan), plan).shape == (6, 4, 5)


def test_dc_coefficient_is_scaled_mean() -> None:
    x = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    coeffs = dct.forward(x, dct.plan_blocks((64,), 64))
    torch.testing.assert_close(coeffs[0, 0], x.sum() / 8, atol=1e-12, rtol=0)  # 1/√64 · Σx
    const = torch.full((64,), 2.0, dtype=torch.float64)
    c = dct.forward(const, dct.plan_blocks((64,), 64))
    torch.testing.assert_close(c[0, 1:], torch.zeros(63, dtype=torch.float64), atol=1e-12, rtol=0)


def test_fp32_round_trip_is_close() -> None:
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(2))
    plan = dct.plan_blocks(x.shape, 64)
    coeffs = dct.forward(x, plan)
    assert coeffs.dtype == torch.float32
    torch.testing.assert_close(dct.inverse(coeffs, plan), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(0,), (0, 4), (4, 0), (0, 3, 2), (2, 0, 3)])
def test_plan_blocks_rejects_empty(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="empty tensor"):
        dct.plan_blocks(shape, 64)
