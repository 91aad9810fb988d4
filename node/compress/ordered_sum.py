"""Sums of magnitudes per chunk, added strictly left to right: the order that defines the sign codec's scales.

A sign frame's scale is ``Σ|x_j| / len`` over a chunk, with the sum taken element by element from the chunk's
first element to its last, each addition rounded in the accumulation dtype (fp32, or fp64 on the overflow path).
That is exactly what the codec's first implementation computed with ``index_add_`` on CPU, so frames stay
byte-identical to those recorded in tests/vectors and every implementation of the codec can reproduce them.
torch's own ``sum`` adds pairwise / in vector lanes and gives different last bits, and ``cumsum`` accumulates fp32
in fp64, so neither can be used.

On CPU the sums run in numpy's ``add.accumulate`` (a sequential scan) over cache-sized tiles, with no per-element
chunk index and no full-size temporaries: a long chunk is scanned tile by tile with the running sum carried over;
chunks up to a tile long are scanned a tile of chunks at a time (``add.accumulate`` along each row); many short
chunks (``block`` ≤ ``_COLUMN_BLOCK``) are summed column by column across a tile of rows, which adds the same values
in the same order per chunk but vectorised across chunks. On other devices (no numpy) the sums are
torch's deterministic reductions; their last bits may differ from the CPU's, which no receiver depends on: a
receiver uses the scales it is sent, it never recomputes them.
"""
from __future__ import annotations

import numpy as np
import torch

#: elements per tile of the CPU scans: small enough for the L2 cache, large enough that Python's per-call
#: overhead (a few µs per tile) stays far below the scan itself
_TILE = 1 << 16
#: chunks at most this long are summed column by column (one vectorised add per column across a tile of chunks);
#: longer ones by a sequential scan per chunk (measured on 10M elements: columns 5–21 ms for 1–256 elements per
#: chunk, scans ~31 ms whatever the length)
_COLUMN_BLOCK = 128

_NUMPY_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


def chunk_abs_sums(flat: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    """Per chunk, the left-to-right sum of ``|flat|``, each addition rounded in ``dtype``.

    ``flat``: (N,) fp32, any device. ``block``: chunk length, 0 = one chunk for the whole tensor (none when N is 0);
    with ``block > 0`` the last chunk holds the ``N mod block`` remaining elements, if any. ``dtype``: fp32 or fp64
    (the accumulator; inputs are widened exactly). Returns (chunks,) of ``dtype`` on ``flat``'s device, chunks =
    0, 1 or ceil(N/block). Raises ValueError for a negative ``block`` or another ``dtype``."""
    if block < 0:
        raise ValueError(f"block must be ≥ 0, got {block}")
    if dtype not in _NUMPY_DTYPE:
        raise ValueError(f"accumulation dtype must be float32 or float64, got {dtype}")
    if flat.device.type != "cpu":
        return chunk_abs_sums_tensor(flat, block, dtype)
    n = flat.numel()
    if n == 0:
        return torch.zeros(0, dtype=dtype)
    length = n if block == 0 else block
    full = n // length  # chunks of exactly `length` elements
    src = flat.detach().reshape(-1).to(torch.float32).numpy()  # (N,) fp32, shares memory
    out = np.empty(full + (1 if n % length else 0), dtype=_NUMPY_DTYPE[dtype])  # (chunks,)
    rows = src[:full * length].reshape(full, length)  # (full, length)
    with np.errstate(over="ignore"):  # an fp32 sum may overflow to inf: the caller's cue to sum again in fp64
        if length <= _COLUMN_BLOCK:
            _sum_by_columns(rows, out[:full])
        elif length <= _TILE:
            _sum_by_row_scans(rows, out[:full])
        else:
            for r in range(full):
                out[r] = _scan_sum(rows[r], out.dtype)
        if n % length:
            out[full] = _scan_sum(src[full * length:], out.dtype)
    return torch.from_numpy(out)


def _scan_sum(row: np.ndarray, dtype: np.dtype) -> np.generic:
    """Left-to-right sum of ``|row|`` (1-D, fp32) in ``dtype``: tile by tile, each tile's first element added to the
    running sum before the tile is scanned, so the additions are exactly ``((0 + a0) + a1) + …``."""
    buf = np.empty(min(row.size, _TILE), dtype=dtype)  # (≤ TILE,)
    carry = dtype.type(0)
    for start in range(0, row.size, _TILE):
        seg = buf[:min(_TILE, row.size - start)]
        np.abs(row[start:start + seg.size], out=seg)  # fp32 → dtype: exact
        seg[0] += carry
        np.add.accumulate(seg, out=seg)  # seg[i] = seg[i-1] + seg[i], in order
        carry = seg[-1]
    return carry


def _sum_by_columns(rows: np.ndarray, out: np.ndarray) -> None:
    """``out[r]`` = left-to-right sum of ``|rows[r]|`` for each row of ``rows`` (R, L), L ≥ 1: per tile of rows, the
    first column copied and every further column added in order — the same additions as a scan of each row."""
    count, length = rows.shape
    per_tile = max(1, _TILE // length)
    buf = np.empty((min(per_tile, count), length), dtype=out.dtype)  # (rows per tile, L)
    for start in range(0, count, per_tile):
        tile = buf[:min(per_tile, count - start)]
        np.abs(rows[start:start + tile.shape[0]], out=tile)
        acc = out[start:start + tile.shape[0]]  # (rows in tile,)
        acc[:] = tile[:, 0]  # 0 + a0 = a0 exactly (|a0| is never -0)
        for j in range(1, length):
            acc += tile[:, j]


def _sum_by_row_scans(rows: np.ndarray, out: np.ndarray) -> None:
    """``out[r]`` = left-to-right sum of ``|rows[r]|`` for each row of ``rows`` (R, L), 1 ≤ L ≤ TILE: per tile of
    rows, one scan along each row (``add.accumulate`` over axis 1 runs each row in order), its last column kept."""
    count, length = rows.shape
    per_tile = max(1, _TILE // length)
    buf = np.empty((min(per_tile, count), length), dtype=out.dtype)  # (rows per tile, L)
    for start in range(0, count, per_tile):
        tile = buf[:min(per_tile, count - start)]
        np.abs(rows[start:start + tile.shape[0]], out=tile)
        np.add.accumulate(tile, axis=1, out=tile)
        out[start:start + tile.shape[0]] = tile[:, -1]


def chunk_abs_sums_tensor(flat: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    """``chunk_abs_sums`` with torch's reductions, for any device (what non-CPU tensors use): the same shapes and
    the same sums up to rounding — deterministic, but not necessarily the left-to-right order's last bits."""
    n = flat.numel()
    if n == 0:
        return torch.zeros(0, dtype=dtype, device=flat.device)
    length = n if block == 0 else block
    full = n // length
    mags = flat.detach().reshape(-1).abs().to(dtype)  # (N,)
    sums = mags[:full * length].view(full, length).sum(dim=1)  # (full,)
    if n % length:
        sums = torch.cat([sums, mags[full * length:].sum().reshape(1)])
    return sums
