"""Chunked orthonormal DCT-II over tensors (docs/algorithms.md, §5), batched and device-agnostic.

Every tensor is viewed as 2-D — 1-D as (1, d), scalars as (1, 1), >2-D as (shape[0], −1) — and cut
into blocks (br, bc) whose sides are the largest divisors of each dimension that do not exceed the
target chunk (so 50257 → 29, 96 → 48, a prime above the target → 1). A block B becomes
X = C_br · B · C_bcᵀ; the inverse is B = C_brᵀ · X · C_bc. C is orthonormal, so the pair is exactly
inverse and preserves the Euclidean norm. 1-D tensors get br = 1 (C_1 = [1]), i.e. a 1-D DCT per chunk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Shape = tuple[int, ...]
_MATRICES: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def chunk_length(d: int, target: int) -> int:
    """The largest divisor of ``d`` that is ≤ ``target``."""
    if d < 1 or target < 1:
        raise ValueError(f"chunk_length needs d ≥ 1 and target ≥ 1, got d={d}, target={target}")
    for c in range(min(d, target), 0, -1):
        if d % c == 0:
            return c
    return 1  # unreachable: 1 divides everything


def dct_matrix(n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, n) orthonormal DCT-II matrix C (row k = frequency k); cached per (n, device, dtype)."""
    key = (n, torch.device(device), dtype)
    mat = _MATRICES.get(key)
    if mat is None:
        k = torch.arange(n, dtype=torch.float64).unsqueeze(1)  # (n, 1)
        j = torch.arange(n, dtype=torch.float64).unsqueeze(0)  # (1, n)
        c = math.sqrt(2.0 / n) * torch.cos(math.pi * (2 * j + 1) * k / (2 * n))  # (n, n)
        c[0] /= math.sqrt(2.0)
        mat = c.to(device=device, dtype=dtype)
        _MATRICES[key] = mat
    return mat


@dataclass(frozen=True)
class BlockPlan:
    """How a tensor of ``shape`` is cut into DCT blocks."""

    shape: Shape
    rows: int
    cols: int
    br: int
    bc: int

    @property
    def nblocks(self) -> int:
        return (self.rows // self.br) * (self.cols // self.bc)

    @property
    def block_size(self) -> int:
        return self.br * self.bc


def plan_blocks(shape: Shape, target: int) -> BlockPlan:
    numel = math.prod(shape)
    if numel == 0:
        raise ValueError(f"cannot DCT an empty tensor of shape {shape}")
    if len(shape) <= 1:
        rows, cols = 1, max(numel, 1)
    else:
        rows, cols = shape[0], numel // shape[0]
    return BlockPlan(tuple(shape), rows, cols, chunk_length(rows, target), chunk_length(cols, target))


def forward(x: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """Tensor of ``plan.shape`` → (nblocks, block_size) DCT coefficients, in x's dtype and device."""
    nr, nc = plan.rows // plan.br, plan.cols // plan.bc
    b = x.reshape(nr, plan.br, nc, plan.bc).permute(0, 2, 1, 3)  # (nr, nc, br, bc)
    cr = dct_matrix(plan.br, x.device, x.dtype)
    cc = dct_matrix(plan.bc, x.device, x.dtype)
    coeffs = cr @ b @ cc.T  # (nr, nc, br, bc)
    return coeffs.reshape(nr * nc, plan.block_size)


def inverse(coeffs: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """(nblocks, block_size) coefficients → tensor of ``plan.shape``."""
    nr, nc = plan.rows // plan.br, plan.cols // plan.bc
    big = coeffs.reshape(nr, nc, plan.br, plan.bc)
    cr = dct_matrix(plan.br, coeffs.device, coeffs.dtype)
    cc = dct_matrix(plan.bc, coeffs.device, coeffs.dtype)
    blocks = cr.T @ big @ cc  # (nr, nc, br, bc)
    return blocks.permute(0, 2, 1, 3).reshape(plan.shape)
