"""Sums of magnitudes per chunk, added strictly left to right: the order that defines the sign codec's scales.

A sign frame's scale is ``Σ|x_j| / len`` over a chunk, with the sum taken element by element from the chunk's
first element to its last, each addition rounded in the accumulation dtype (fp32, or fp64 on the overflow path).
That is exactly what the codec's first implementation computed with ``index_add_`` over a per-element chunk index,
so frames stay byte-identical to those recorded in tests/vectors, and every implementation of the codec can
reproduce them. torch's ``sum`` adds pairwise / in vector lanes and gives different last bits, and ``cumsum``
accumulates fp32 in fp64, so neither can be used.

On CPU the sums are ``torch.segment_reduce(…, "sum", lengths=…)``: its CPU kernel runs one plain loop per segment
with the running sum in a register of the input's dtype — the left-to-right order, ~10× faster than ``index_add_``
(no (N,) int64 index, no store and reload per element). The magnitudes come from numpy's ``abs`` (numpy backs large
arrays with transparent huge pages: far fewer page faults than a fresh torch allocation). That the kernel keeps this
order is checked, not assumed: tests/unit/compress/test_sign_fast_path.py compares it with an ``index_add_``
reference and with a Python loop over shapes, chunk lengths and magnitudes. On other devices the sums are torch's
deterministic reductions, whose last bits may differ from the CPU's; no receiver depends on them: a receiver uses the
scales it is sent, it never recomputes them.
"""
from __future__ import annotations

import numpy as np
import torch

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
    lengths = torch.full((full + (1 if n % length else 0),), length, dtype=torch.int64)  # (chunks,)
    if n % length:
        lengths[-1] = n % length
    mags = np.abs(flat.detach().reshape(-1).to(torch.float32).numpy())  # (N,) fp32
    if dtype == torch.float64:
        mags = mags.astype(np.float64)  # exact
    return torch.segment_reduce(torch.from_numpy(mags), "sum", lengths=lengths, unsafe=True)


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
