"""Bit packing of booleans and small unsigned integers into byte buffers, on any device.

Booleans on CPU go through numpy's ``packbits``/``unpackbits`` (bit order "little": ~100× faster than the tensor
arithmetic, which does a multiply and an 8-wide reduction per byte); on other devices everything is plain tensor
arithmetic (no Python loops over elements), so packing runs on CUDA tensors without a round trip to the CPU. Both
give the same bytes. Layout is little-endian within a byte and LSB-first within a value: value i occupies bits
[i*w, (i+1)*w) of the stream, bit b of the stream is bit (b % 8) of byte b // 8.
"""
from __future__ import annotations

import math

import numpy as np
import torch

_BIT_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _weights(device: torch.device) -> torch.Tensor:
    w = _BIT_WEIGHTS.get(device)
    if w is None:
        w = (2 ** torch.arange(8, dtype=torch.int32, device=device)).to(torch.uint8)  # (8,)
        _BIT_WEIGHTS[device] = w
    return w


def packed_bits_nbytes(count: int, width: int) -> int:
    """Bytes needed for ``count`` values of ``width`` bits each."""
    return math.ceil(count * width / 8)


def pack_bools(bits: torch.Tensor) -> torch.Tensor:
    """(N,) bool (any shape, read in row-major order) → (ceil(N/8),) uint8 on the same device; padding bits 0."""
    if bits.device.type != "cpu":
        return pack_bools_tensor(bits)
    flat = bits.detach().reshape(-1).to(torch.bool).numpy()  # (N,)
    return torch.from_numpy(np.packbits(flat, bitorder="little"))


def unpack_bools(packed: torch.Tensor, count: int) -> torch.Tensor:
    """(ceil(count/8),) uint8 → (count,) bool on the same device (fewer when ``packed`` holds fewer bits)."""
    if packed.device.type != "cpu":
        return unpack_bools_tensor(packed, count)
    raw = packed.reshape(-1).numpy()  # (B,) uint8
    return torch.from_numpy(np.unpackbits(raw, count=max(0, min(count, 8 * raw.size)), bitorder="little")
                            .view(np.bool_))


def pack_bools_tensor(bits: torch.Tensor) -> torch.Tensor:
    """``pack_bools`` in tensor arithmetic, for any device (what non-CPU tensors use): the same bytes."""
    n = bits.numel()
    pad = (-n) % 8
    b = bits.reshape(-1).to(torch.uint8)
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    b = b.view(-1, 8)  # (N/8, 8)
    return (b * _weights(b.device)).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bools_tensor(packed: torch.Tensor, count: int) -> torch.Tensor:
    """``unpack_bools`` in tensor arithmetic, for any device (what non-CPU tensors use): the same booleans."""
    p = packed.reshape(-1, 1)  # (B, 1)
    bits = (p & _weights(p.device)) != 0  # (B, 8)
    return bits.reshape(-1)[:max(0, count)]


def pack_uints(values: torch.Tensor, width: int) -> torch.Tensor:
    """(N,) integers in [0, 2**width) → (ceil(N*width/8),) uint8. ``width`` 0 packs to nothing."""
    n = values.numel()
    if width == 0 or n == 0:
        return torch.empty(0, dtype=torch.uint8, device=values.device)
    shifts = torch.arange(width, dtype=torch.int64, device=values.device)  # (w,)
    bits = ((values.reshape(-1, 1).to(torch.int64) >> shifts) & 1).bool()  # (N, w)
    return pack_bools(bits.reshape(-1))


def unpack_uints(packed: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """Inverse of ``pack_uints``: → (count,) int64."""
    if width == 0 or count == 0:
        return torch.zeros(count, dtype=torch.int64, device=packed.device)
    bits = unpack_bools(packed, count * width).view(count, width).to(torch.int64)  # (N, w)
    shifts = torch.arange(width, dtype=torch.int64, device=packed.device)
    return (bits << shifts).sum(dim=1)


def index_width(block_size: int) -> int:
    """Bits per index into a block of ``block_size`` coefficients: ceil(log2(block_size))."""
    return max(0, math.ceil(math.log2(block_size))) if block_size > 1 else 0
