"""1-bit sign codec: packed signs (8 per byte) plus one mean-magnitude scale per chunk.

A chunk is the whole tensor (``block=0``) or consecutive runs of ``block`` elements (the last may be
short). ``x ≥ 0`` is sent as +1: a bit cannot carry torch's sign(0) = 0, and error feedback keeps the
difference. Reduce ``mean`` averages the scaled signs; ``vote`` takes the majority sign times the mean
scale (ties give 0).

Range: a scale is saturated at its wire type's limit (f16: 65504; f32 and bf16: just below 1e30), never ±inf;
the sender's error feedback keeps the rest. Means of inputs near fp32's limit are taken in fp64, so they do not
overflow on the way.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import torch

from node.compress.base import WIRE_DTYPES, WIRE_LIMIT, BufferSpec, Codec, Encoded, Shape, numel_of, saturate
from node.compress.bitpack import pack_bools, unpack_bools
from node.errors import ConfigError, PayloadError


class SignCodec(Codec):
    name: ClassVar[str] = "sign"

    def __init__(self, block: int = 0, scale_dtype: str = "f32", reduce: str = "mean") -> None:
        if not isinstance(block, int) or isinstance(block, bool) or block < 0:
            raise ConfigError(f"sign.block must be an integer ≥ 0 (0 = one scale per tensor), got {block!r}")
        if scale_dtype not in ("f32", "f16", "bf16"):
            raise ConfigError(f"sign.scale_dtype must be f32, f16 or bf16, got {scale_dtype!r}")
        if reduce not in ("mean", "vote"):
            raise ConfigError(f"sign.reduce must be 'mean' or 'vote', got {reduce!r}")
        self.block, self.scale_dtype, self.reduce_mode = block, scale_dtype, reduce

    def params(self) -> dict[str, Any]:
        return {"block": self.block, "scale_dtype": self.scale_dtype, "reduce": self.reduce_mode}

    def _chunks(self, n: int) -> int:
        if n == 0:
            return 0
        return 1 if self.block == 0 else math.ceil(n / self.block)

    def layout(self, shape: Shape) -> dict[str, BufferSpec]:
        n = numel_of(shape)
        return {"bits": BufferSpec(torch.uint8, math.ceil(n / 8)),
                "scales": BufferSpec(WIRE_DTYPES[self.scale_dtype], self._chunks(n))}

    def _chunk_ids(self, n: int, device: torch.device) -> torch.Tensor:
        """(n,) index of the chunk each element belongs to."""
        if self.block == 0:
            return torch.zeros(n, dtype=torch.int64, device=device)
        return torch.arange(n, device=device) // self.block

    def encode(self, x: torch.Tensor) -> Encoded:
        flat = x.detach().reshape(-1).to(torch.float32)  # (N,)
        n = flat.numel()
        chunks = self._chunks(n)
        ids = self._chunk_ids(n, flat.device)
        abs_sum = torch.zeros(chunks, dtype=torch.float32, device=flat.device)
        abs_sum.index_add_(0, ids, flat.abs())
        counts = torch.bincount(ids, minlength=chunks).to(torch.float32)
        means = abs_sum / counts.clamp_min(1)  # (chunks,)
        if chunks and not bool(torch.isfinite(means).all()):
            # the fp32 sum overflowed (inputs near fp32's limit): the same mean in fp64 (rare path, so the common one
            # stays bit-identical to a plain fp32 mean)
            wide = torch.zeros(chunks, dtype=torch.float64, device=flat.device)
            wide.index_add_(0, ids, flat.abs().double())
            means = wide / counts.double().clamp_min(1)
        scales = saturate(means, WIRE_DTYPES[self.scale_dtype])  # (chunks,)
        return {"bits": pack_bools(flat >= 0), "scales": scales}

    def wire_limit(self) -> float:
        return WIRE_LIMIT[WIRE_DTYPES[self.scale_dtype]]

    def _signs(self, enc: Encoded, n: int) -> torch.Tensor:
        """(N,) fp32 of ±1."""
        return unpack_bools(enc["bits"], n).to(torch.float32) * 2 - 1

    def _per_element(self, per_chunk: torch.Tensor, n: int) -> torch.Tensor:
        """(chunks,) → (N,): each chunk's value repeated over its elements (no (N,) int64 index to build)."""
        if self.block == 0:
            return per_chunk.expand(n)
        return per_chunk.repeat_interleave(self.block)[:n]

    def decode(self, enc: Encoded, shape: Shape) -> torch.Tensor:
        n = numel_of(shape)
        scales = self._per_element(enc["scales"].to(torch.float32), n)  # (N,)
        return (self._signs(enc, n) * scales).reshape(shape)

    def reduce(self, encs: Sequence[Encoded], shape: Shape) -> torch.Tensor:
        if self.reduce_mode == "mean":
            return super().reduce(encs, shape)
        return self.vote(encs, shape)

    def vote(self, encs: Sequence[Encoded], shape: Shape) -> torch.Tensor:
        """Majority vote: ``sign(Σ_i ±1_i) · (1/n) Σ_i s_i`` per element (scales averaged per chunk), ties → 0;
        fp32, ``shape``. signSGD with majority vote: Bernstein et al., arXiv 1810.05291. Raises ValueError when
        ``encs`` is empty."""
        if not encs:
            raise ValueError("reduce needs at least one payload")
        n = numel_of(shape)
        votes = sum(self._signs(e, n) for e in encs)  # (N,) in [-n, n]
        mean_scale = sum(e["scales"].to(torch.float32) for e in encs) / len(encs)  # (chunks,)
        return (torch.sign(votes) * self._per_element(mean_scale, n)).reshape(shape)

    def norm(self, enc: Encoded, shape: Shape) -> float:
        """‖decode‖₂ = sqrt(Σ_chunks s_c² · len_c) (fp64), from the scales alone."""
        n = numel_of(shape)
        scales = enc["scales"].double()
        if n == 0:
            return 0.0
        if self.block == 0:
            lengths = torch.tensor([float(n)], dtype=torch.float64)
        else:
            lengths = torch.full((scales.numel(),), float(self.block), dtype=torch.float64)
            lengths[-1] = float(n - self.block * (scales.numel() - 1))
        return float((scales.square() * lengths).sum().sqrt())

    def magnitude_buffers(self, enc: Encoded) -> tuple[str, ...]:
        return ("scales",)

    def validate(self, enc: Encoded, shape: Shape) -> None:
        super().validate(enc, shape)
        scales = enc["scales"]
        if bool((scales < 0).any()):
            raise PayloadError("sign: buffer 'scales' holds negative values (scales are mean magnitudes)")
