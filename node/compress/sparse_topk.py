"""Chunked top-k with statistically quantized values: the payload of SparseLoCo (Sarfi, Thérien, Lidin, Belilovsky,
"Communication Efficient LLM Pre-training with SparseLoCo", arXiv 2508.15706; docs/algorithms.md, §SparseLoCo).

A tensor is flattened and cut into chunks of ``chunk`` elements (the last may be shorter); each chunk keeps its
k' = min(k, chunk length) largest-magnitude entries, in parameter space (no transform). The kept values of the
whole tensor are quantized to ``bits`` bits with the statistical quantizer of the SparseLoCo reference code:

    shift = mean(v);  c = v − shift;  σ = ‖c‖₂ / sqrt(n − 1);  step = range·σ / 2^bits   (step = 1 when σ = 0)
    code  = clamp(round(c / step + 2^(bits−1)), 0, 2^bits − 1)
    level[b] = mean of the c whose code is b (0 for an empty bin);   decoded value = level[code] + shift

so the receiver needs the codes, the 2^bits levels and the shift. Buffers per tensor of N elements, with
nc = ceil(N / chunk) chunks and K = Σ k' kept entries:
- ``indices``: K indices bit-packed at ceil(log2 chunk) bits, ascending within each chunk (canonical order,
  so a duplicate is detectable); 0 bytes when every entry is kept;
- ``codes``: K codes bit-packed at ``bits`` bits;
- ``levels``: 2^bits f32; ``shift``: 1 f32.
Reduce ``mean`` divides the sum of every worker's decoded sparse tensor by the number of workers (the paper's
Δ = (1/R) Σ_r Δ̂_r); ``selector-mean`` divides each entry by the number of workers that kept it (what the reference
implementation's scatter-mean does), a separately named variant.

Range: ``levels`` and ``shift`` are saturated just below ±1e30 (what receivers accept), never ±inf; the sender's
error feedback keeps the rest. The quantizer's statistics of values near fp32's limit are taken in fp64, where
they cannot overflow (docs/algorithms.md, §5, range).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import torch

from node.compress.base import BufferSpec, Codec, Encoded, Shape, numel_of, saturate
from node.compress.bitpack import index_width, pack_uints, packed_bits_nbytes, unpack_uints
from node.errors import ConfigError, PayloadError


class SparseTopKCodec(Codec):
    name: ClassVar[str] = "sparse_topk"

    def __init__(self, k: int = 64, chunk: int = 4096, bits: int = 2, range_sigmas: float = 6.0,
                 reduce: str = "mean") -> None:
        for field, value, low in (("k", k, 1), ("chunk", chunk, 1), ("bits", bits, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"sparse_topk.{field} must be an integer ≥ {low}, got {value!r}")
        if bits > 8:
            raise ConfigError(f"sparse_topk.bits must be at most 8, got {bits}")
        if not (isinstance(range_sigmas, (int, float)) and math.isfinite(range_sigmas) and range_sigmas > 0):
            raise ConfigError(f"sparse_topk.range_sigmas must be a positive number, got {range_sigmas!r}")
        if reduce not in ("mean", "selector-mean"):
            raise ConfigError(f"sparse_topk.reduce must be 'mean' or 'selector-mean', got {reduce!r}")
        self.k, self.chunk, self.bits = k, chunk, bits
        self.range_sigmas, self.reduce_mode = float(range_sigmas), reduce

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "chunk": self.chunk, "bits": self.bits, "range_sigmas": self.range_sigmas,
                "reduce": self.reduce_mode}

    @property
    def density(self) -> float:
        """Fraction of the entries of a full chunk that are sent."""
        return min(self.k, self.chunk) / self.chunk

    # -- geometry --------------------------------------------------------------------------------------
    def _plan(self, n: int) -> tuple[int, int, int, int]:
        """(full chunks, kept per full chunk, length of the short last chunk (0: none), kept in it)."""
        full, rest = divmod(n, self.chunk)
        return full, min(self.k, self.chunk), rest, min(self.k, rest)

    def _kept(self, n: int) -> int:
        full, kept, rest, kept_rest = self._plan(n)
        return full * kept + kept_rest

    def _index_width(self, n: int) -> int:
        full, kept, rest, kept_rest = self._plan(n)
        everything = (full == 0 or kept == self.chunk) and kept_rest == rest
        return 0 if everything else index_width(self.chunk if full else rest)

    def layout(self, shape: Shape) -> dict[str, BufferSpec]:
        n = numel_of(shape)
        count = self._kept(n)
        return {"indices": BufferSpec(torch.uint8, packed_bits_nbytes(count, self._index_width(n))),
                "codes": BufferSpec(torch.uint8, packed_bits_nbytes(count, self.bits)),
                "levels": BufferSpec(torch.float32, 2 ** self.bits),
                "shift": BufferSpec(torch.float32, 1)}

    def _select(self, flat: torch.Tensor) -> torch.Tensor:
        """(N,) → (K,) int64 flat positions of the kept entries, ascending within each chunk (and overall)."""
        n = flat.numel()
        full, kept, rest, kept_rest = self._plan(n)
        parts = []
        if full:
            body = flat[:full * self.chunk].abs().view(full, self.chunk)  # (full, chunk)
            top = torch.sort(torch.topk(body, kept, dim=1, sorted=False).indices, dim=1).values  # (full, kept)
            base = torch.arange(full, device=flat.device).unsqueeze(1) * self.chunk
            parts.append((top + base).reshape(-1))
        if rest:
            tail = flat[full * self.chunk:].abs()  # (rest,)
            top = torch.sort(torch.topk(tail, kept_rest, sorted=False).indices).values
            parts.append(top + full * self.chunk)
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=flat.device)

    def _local(self, positions: torch.Tensor, n: int) -> torch.Tensor:
        """Flat positions → positions within their chunk (what goes on the wire)."""
        return positions % self.chunk if n > self.chunk else positions

    def _positions(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Inverse of ``_local``: which chunk each kept entry is in follows from the count kept per chunk."""
        full, kept, rest, kept_rest = self._plan(n)
        chunk_of = torch.cat([torch.arange(full, device=local.device).repeat_interleave(kept),
                              torch.full((kept_rest,), full, dtype=torch.int64, device=local.device)])
        return chunk_of * self.chunk + local

    # -- quantizer -------------------------------------------------------------------------------------
    def _quantize(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K,) fp32 → codes (K,) int64, levels (2^bits,) fp32, shift (1,) fp32."""
        bins = 2 ** self.bits
        if values.numel() == 0:
            return (torch.zeros(0, dtype=torch.int64, device=values.device),
                    torch.zeros(bins, dtype=torch.float32, device=values.device),
                    torch.zeros(1, dtype=torch.float32, device=values.device))
        stats = self._statistics(values, bins)
        if stats is None:
            # a sum overflowed fp32 (values near its limit): the same statistics in fp64, which holds any fp32
            # input's (rare path, so the common one stays the fp32 arithmetic of the reference code)
            stats = self._statistics(values.double(), bins)
            assert stats is not None
        codes, levels, shift = stats
        return codes, saturate(levels, torch.float32), saturate(shift.reshape(1), torch.float32)

    def _statistics(self, values: torch.Tensor, bins: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The quantizer in ``values``' dtype: codes (K,) int64, levels (bins,), shift (); None when a statistic
        overflows that dtype."""
        shift = values.mean()
        centered = values - shift
        norm = centered.norm()
        if not bool(torch.isfinite(shift) & torch.isfinite(norm)):
            return None
        sigma = norm / math.sqrt(max(1, centered.numel() - 1))
        step = self.range_sigmas * sigma / bins
        if not (bool(torch.isfinite(step)) and float(step) > 0):
            step = torch.ones((), dtype=values.dtype, device=values.device)
        codes = (centered / step + bins // 2).round().clamp(0, bins - 1).to(torch.int64)  # (K,)
        sums = torch.zeros(bins, dtype=values.dtype, device=values.device).scatter_add_(0, codes, centered)
        counts = torch.zeros(bins, dtype=values.dtype, device=values.device).scatter_add_(
            0, codes, torch.ones_like(centered))
        levels = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))  # (bins,)
        if not bool(torch.isfinite(levels).all()):
            return None
        return codes, levels, shift

    # -- codec -----------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Encoded:
        flat = x.detach().reshape(-1).to(torch.float32)  # (N,)
        n = flat.numel()
        positions = self._select(flat)  # (K,)
        codes, levels, shift = self._quantize(flat[positions])
        return {"indices": pack_uints(self._local(positions, n), self._index_width(n)),
                "codes": pack_uints(codes, self.bits), "levels": levels, "shift": shift}

    def _sparse(self, enc: Encoded, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers → (positions (K,) int64, values (K,) fp32)."""
        count = self._kept(n)
        width = self._index_width(n)
        if width == 0:
            positions = torch.arange(count, dtype=torch.int64, device=enc["codes"].device)
        else:
            positions = self._positions(unpack_uints(enc["indices"], count, width), n)
        codes = unpack_uints(enc["codes"], count, self.bits)
        values = enc["levels"].to(torch.float32)[codes] + enc["shift"].to(torch.float32)
        return positions, values

    def decode(self, enc: Encoded, shape: Shape) -> torch.Tensor:
        n = numel_of(shape)
        positions, values = self._sparse(enc, n)
        out = torch.zeros(n, dtype=torch.float32, device=values.device)
        out.index_put_((positions,), values)
        return out.reshape(shape)

    def norm(self, enc: Encoded, shape: Shape) -> float:
        """‖decode‖₂ (fp64) over the kept entries."""
        _, values = self._sparse(enc, numel_of(shape))
        return float(values.double().square().sum().sqrt())

    def magnitude_buffers(self, enc: Encoded) -> tuple[str, ...]:
        return ("levels", "shift")  # a value is level[code] + shift: both scale with it

    def reduce(self, encs: Sequence[Encoded], shape: Shape) -> torch.Tensor:
        if not encs:
            raise ValueError("reduce needs at least one payload")
        n = numel_of(shape)
        total = torch.zeros(n, dtype=torch.float32, device=encs[0]["codes"].device)
        picks = torch.zeros_like(total)
        for enc in encs:  # in the callers' fixed (sender) order: bit-identical everywhere
            positions, values = self._sparse(enc, n)
            total.index_add_(0, positions, values)
            picks.index_add_(0, positions, torch.ones_like(values))
        total = total / (picks.clamp_min(1.0) if self.reduce_mode == "selector-mean" else float(len(encs)))
        return total.reshape(shape)

    def validate(self, enc: Encoded, shape: Shape) -> None:
        super().validate(enc, shape)
        n = numel_of(shape)
        width = self._index_width(n)
        if width == 0:
            return
        full, kept, rest, kept_rest = self._plan(n)
        local = unpack_uints(enc["indices"], self._kept(n), width)
        head, tail = local[:full * kept].view(full, kept), local[full * kept:]
        if bool((head >= self.chunk).any()) or bool((tail >= max(rest, 1)).any()):
            raise PayloadError("sparse_topk: an index is past the end of its chunk")
        ascending = [head[:, 1:] > head[:, :-1]] if kept > 1 else []
        ascending += [tail[1:] > tail[:-1]] if kept_rest > 1 else []
        if not all(bool(a.all()) for a in ascending):
            raise PayloadError("sparse_topk: indices within a chunk are not strictly ascending (duplicate or "
                               "unordered)")
