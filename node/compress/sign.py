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
from node.compress.ordered_sum import chunk_abs_sums
from node.compress.signbits import add_signed_values_, pack_signs, signed_values
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

    def _counts(self, n: int) -> torch.Tensor:
        """(chunks,) fp32: elements per chunk, each count rounded to fp32 as the int64 → fp32 cast rounds it."""
        chunks = self._chunks(n)
        if self.block == 0:
            counts = torch.full((chunks,), n, dtype=torch.int64)
        else:
            counts = torch.full((chunks,), self.block, dtype=torch.int64)
            if chunks:
                counts[-1] = n - self.block * (chunks - 1)
        return counts.to(torch.float32)

    def encode(self, x: torch.Tensor) -> Encoded:
        """fp32 tensor (any shape, any device) → ``bits`` (ceil(N/8),) uint8 and ``scales`` (chunks,) of
        ``scale_dtype``: per chunk the mean magnitude, its sum taken left to right in fp32
        (node/compress/ordered_sum.py: the order fixes the scale's last bits), in fp64 where the fp32 sum overflows."""
        flat = x.detach().reshape(-1).to(torch.float32)  # (N,)
        n = flat.numel()
        counts = self._counts(n).to(flat.device)  # (chunks,)
        means = chunk_abs_sums(flat, self.block, torch.float32).to(flat.device) / counts.clamp_min(1)  # (chunks,)
        if n and not bool(torch.isfinite(means).all()):
            # the fp32 sum overflowed (inputs near fp32's limit): the same mean in fp64 (rare path, so the common one
            # stays bit-identical to a plain fp32 mean)
            wide = chunk_abs_sums(flat, self.block, torch.float64).to(flat.device)
            means = wide / counts.double().clamp_min(1)
        scales = saturate(means, WIRE_DTYPES[self.scale_dtype])  # (chunks,)
        return {"bits": pack_signs(flat), "scales": scales}

    def wire_limit(self) -> float:
        return WIRE_LIMIT[WIRE_DTYPES[self.scale_dtype]]

    def decode(self, enc: Encoded, shape: Shape) -> torch.Tensor:
        """Buffers → fp32 of ``shape``: ``(2·bit − 1) · scale`` of the element's chunk."""
        return signed_values(enc["bits"], enc["scales"].to(torch.float32), numel_of(shape), self.block).reshape(shape)

    def reduce(self, encs: Sequence[Encoded], shape: Shape) -> torch.Tensor:
        """``mean``: ``(1/n) Σ_i decode_i``, added in the given order (bit-identical to ``Codec.reduce``, without its
        copy of the first decode); ``vote``: see ``vote``. fp32 of ``shape``; ValueError when ``encs`` is empty."""
        if self.reduce_mode == "vote":
            return self.vote(encs, shape)
        if not encs:
            raise ValueError("reduce needs at least one payload")
        total = self.decode(encs[0], shape).reshape(-1)  # (N,) a fresh tensor, ours to add into
        for enc in encs[1:]:
            add_signed_values_(total, enc["bits"], enc["scales"].to(torch.float32), self.block)
        return total.div_(len(encs)).reshape(shape)

    @property
    def accumulates(self) -> bool:
        return self.reduce_mode == "mean"  # the vote needs every payload's bits at once

    def accumulate(self, total: torch.Tensor | None, enc: Encoded, shape: Shape) -> torch.Tensor:
        """As ``reduce`` ("mean") adds them: the first payload decoded, the next ones added in place; flat (N,) fp32."""
        if total is None:
            return self.decode(enc, shape).reshape(-1)
        return add_signed_values_(total, enc["bits"], enc["scales"].to(torch.float32), self.block)

    def vote(self, encs: Sequence[Encoded], shape: Shape) -> torch.Tensor:
        """Majority vote: ``sign(Σ_i ±1_i) · (1/n) Σ_i s_i`` per element (scales averaged per chunk), ties → 0;
        fp32, ``shape``. signSGD with majority vote: Bernstein et al., arXiv 1810.05291. Raises ValueError when
        ``encs`` is empty."""
        if not encs:
            raise ValueError("reduce needs at least one payload")
        n = numel_of(shape)
        ones = torch.zeros(n, dtype=torch.int32, device=encs[0]["bits"].device)  # (N,) how many payloads say +1
        for e in encs:
            ones += unpack_bools(e["bits"], n)
        votes = ones.mul_(2).sub_(len(encs))  # (N,) in [-n, n]: the sum of the ±1s, exactly
        mean_scale = sum(e["scales"].to(torch.float32) for e in encs) / len(encs)  # (chunks,)
        # sign(votes) · s: +s, −s, or (a tie) 0·s = +0 since s ≥ 0
        signed = signed_values(pack_bools(votes > 0), mean_scale, n, self.block)  # (N,) ±s
        return signed.masked_fill_(votes == 0, 0.0).reshape(shape)

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
