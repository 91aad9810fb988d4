"""Sign bits ↔ floats for the sign codec: ``[x ≥ 0]`` packed 8 per byte, and bits back to ``±scale`` per chunk.

The CPU paths run in numpy. Encoding compares and packs in one ``packbits``. Decoding looks each byte up in a
256-row table of ±1 patterns (row ``b`` = the eight signs of byte ``b``, LSB first), so a byte becomes eight floats
in one 32-byte row copy, with no bool or index tensor in between; numpy also backs its large arrays with transparent
huge pages, which on this path costs far fewer page faults than a fresh torch allocation. Other devices use torch
arithmetic. Every path gives exactly ``(2·bit − 1) · scale``: a product with ±1 is exact, and −1 · 0 is −0.
Layout as node/compress/bitpack.py: bit ``j`` of the stream is bit ``j % 8`` of byte ``j // 8``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from node.compress.bitpack import pack_bools, unpack_bools

#: (256, 8) fp32: row b holds (2·bit_i − 1) for the bits i = 0..7 of byte b, LSB first
_PLUS_MINUS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1,
                            bitorder="little").astype(np.float32) * 2 - 1
_PLUS_MINUS.setflags(write=False)
#: packed bytes expanded per step of ``add_signed_values_``: 8,192 bytes → 65,536 floats (256 KiB, cache-sized)
_TILE_BYTES = 1 << 13


def pack_signs(flat: torch.Tensor) -> torch.Tensor:
    """(N,) fp32 → (ceil(N/8),) uint8 on the same device: bit ``j`` = ``[flat_j ≥ 0]`` (−0 → 1, NaN → 0),
    padding bits 0."""
    if flat.device.type != "cpu":
        return pack_bools(flat >= 0)
    values = flat.detach().reshape(-1).to(torch.float32).numpy()  # (N,)
    return torch.from_numpy(np.packbits(np.greater_equal(values, 0), bitorder="little"))


def signed_values(packed: torch.Tensor, per_chunk: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """Packed bits and per-chunk magnitudes → (N,) fp32: element ``j`` = ``(2·bit_j − 1) · per_chunk[j // block]``
    (``block`` 0: one chunk, ``per_chunk`` of shape (1,) or (0,) when N is 0).

    ``packed``: (≥ ceil(N/8),) uint8; ``per_chunk``: (chunks,) fp32, on the same device as ``packed``. The result
    lives on that device."""
    if packed.device.type != "cpu":
        return _signed_values_tensor(unpack_bools(packed, n), per_chunk, n, block)
    if n == 0:
        return torch.zeros(0, dtype=torch.float32)
    raw = packed.reshape(-1).numpy()[:math.ceil(n / 8)]  # (B,) uint8
    scales = per_chunk.detach().to(torch.float32).numpy()  # (chunks,)
    if block == 0:
        table = _PLUS_MINUS * scales[0]  # (256, 8): ±s per byte pattern
        return torch.from_numpy(np.take(table, raw, axis=0).reshape(-1)[:n])
    out = np.take(_PLUS_MINUS, raw, axis=0).reshape(-1)[:n]  # (N,) ±1
    full = n // block
    body = full * block
    rows = out[:body].reshape(full, block)  # (full, block), a view
    rows *= scales[:full, None]
    if body < n:
        out[body:] *= scales[full]
    return torch.from_numpy(out)


def add_signed_values_(total: torch.Tensor, packed: torch.Tensor, per_chunk: torch.Tensor, block: int) -> torch.Tensor:
    """``total += signed_values(packed, per_chunk, N, block)`` in place, N = ``total.numel()``; returns ``total``.

    The same fp32 additions as adding a decoded tensor, element by element (so bit-identical to it), but on CPU with
    one scale per tensor (``block`` 0) without the (N,) decoded temporary: bytes are expanded a cache-sized tile at
    a time and added at once. ``total``: (N,) contiguous fp32 on ``packed``'s device."""
    n = total.numel()
    if packed.device.type != "cpu" or block != 0 or n == 0:
        return total.add_(signed_values(packed, per_chunk, n, block))
    raw = packed.reshape(-1).numpy()[:math.ceil(n / 8)]  # (B,) uint8
    table = _PLUS_MINUS * per_chunk.detach().to(torch.float32).numpy()[0]  # (256, 8): ±s per byte pattern
    acc = total.detach().numpy()  # (N,), shares memory with total
    buf = np.empty((min(_TILE_BYTES, raw.size), 8), dtype=np.float32)  # (tile, 8)
    for start in range(0, raw.size, _TILE_BYTES):
        seg = buf[:min(_TILE_BYTES, raw.size - start)]
        np.take(table, raw[start:start + seg.shape[0]], axis=0, out=seg)
        lo, hi = 8 * start, min(n, 8 * (start + seg.shape[0]))
        acc[lo:hi] += seg.reshape(-1)[:hi - lo]
    return total


def _signed_values_tensor(bits: torch.Tensor, per_chunk: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """``signed_values`` from unpacked (N,) bool ``bits``, in torch arithmetic (any device)."""
    if n == 0 or block == 0:
        return torch.where(bits, per_chunk, -per_chunk)  # per_chunk (1,) broadcasts
    out = torch.empty(n, dtype=torch.float32, device=bits.device)  # (N,)
    full = n // block
    body = full * block
    if full:
        values = per_chunk[:full, None]  # (full, 1)
        torch.where(bits[:body].view(full, block), values, -values, out=out[:body].view(full, block))
    if body < n:
        torch.where(bits[body:], per_chunk[full], -per_chunk[full], out=out[body:])
    return out


def signed_values_tensor(packed: torch.Tensor, per_chunk: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """``signed_values`` in torch arithmetic, for any device (what non-CPU tensors use): the same floats."""
    return _signed_values_tensor(unpack_bools(packed, n), per_chunk, n, block)
