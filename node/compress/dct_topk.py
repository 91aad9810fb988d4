"""DCT-top-k codec (DeMo and decoupled DCT momentum; docs/algorithms.md, §5): keep the k largest DCT
coefficients of every block.

Buffers per tensor with nb blocks of size bs and k' = min(k, bs) kept coefficients per block:
- ``indices``: nb·k' indices bit-packed at ceil(log2 bs) bits, ascending within each block
  (canonical order, so a duplicate is detectable); omitted (0 bytes) when k' = bs, where every
  coefficient is sent in order.
- values, by ``values`` format: ``f16``/``bf16``/``f32`` → nb·k' floats; ``int8`` → nb·k' signed bytes
  + one f32 absmax/127 scale per block; ``sign`` → nb·k' packed sign bits + one f32 mean-|v| per block.
Reduce ``selector-mean`` averages each coefficient over the workers that picked it (reference
semantics: a coefficient picked by one worker keeps its value); ``mean`` divides by all workers.
Reduction happens in coefficient space followed by one inverse DCT (the transform is linear).

Range: every float on the wire is saturated at its type's limit (f16 values: 65504; f32 and bf16 values and the
f32 scales: just below 1e30), never ±inf; the sender's error feedback keeps the rest. The transform of an input
near fp32's limit is taken in fp64 (its coefficients can be up to √(block size) times larger than any input). An
empty tensor has empty buffers and decodes to an empty tensor.
"""
from __future__ import annotations

import math

from typing import Any, ClassVar, Sequence

import torch

from node.compress import dct
from node.compress.base import (WIRE_DTYPES, WIRE_LIMIT, BufferSpec, Codec, Encoded, Shape, median0, numel_of,
                                saturate)
from node.compress.bitpack import index_width, pack_bools, pack_uints, packed_bits_nbytes, unpack_bools, unpack_uints
from node.errors import ConfigError, PayloadError

VALUE_FORMATS = ("f16", "bf16", "f32", "int8", "sign")


class DctTopKCodec(Codec):
    name: ClassVar[str] = "dct_topk"

    def __init__(self, k: int = 32, chunk: int = 64, values: str = "f16", reduce: str = "selector-mean") -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"dct_topk.k must be an integer ≥ 1, got {k!r}")
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ConfigError(f"dct_topk.chunk must be an integer ≥ 1, got {chunk!r}")
        if values not in VALUE_FORMATS:
            raise ConfigError(f"dct_topk.values must be one of {VALUE_FORMATS}, got {values!r}")
        if reduce not in ("selector-mean", "mean"):
            raise ConfigError(f"dct_topk.reduce must be 'selector-mean' or 'mean', got {reduce!r}")
        self.k, self.chunk, self.values, self.reduce_mode = k, chunk, values, reduce

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "chunk": self.chunk, "values": self.values, "reduce": self.reduce_mode}

    def _dims(self, shape: Shape) -> tuple[dct.BlockPlan, int, int]:
        plan = dct.plan_blocks(shape, self.chunk)
        kept = min(self.k, plan.block_size)
        width = 0 if kept == plan.block_size else index_width(plan.block_size)
        return plan, kept, width

    def wire_limit(self) -> float:
        return WIRE_LIMIT[torch.float16] if self.values == "f16" else WIRE_LIMIT[torch.float32]

    def layout(self, shape: Shape) -> dict[str, BufferSpec]:
        if numel_of(shape) == 0:  # nothing to transform: the same buffers, all empty
            empty = {"indices": BufferSpec(torch.uint8, 0),
                     "values": BufferSpec(WIRE_DTYPES.get(self.values, torch.uint8), 0)}
            return empty | ({"scales": BufferSpec(torch.float32, 0)} if self.values in ("int8", "sign") else {})
        plan, kept, width = self._dims(shape)
        count = plan.nblocks * kept
        out = {"indices": BufferSpec(torch.uint8, packed_bits_nbytes(count, width))}
        if self.values in ("f16", "bf16", "f32"):
            out["values"] = BufferSpec(WIRE_DTYPES[self.values], count)
        elif self.values == "int8":
            out["values"] = BufferSpec(torch.uint8, count)
            out["scales"] = BufferSpec(torch.float32, plan.nblocks)
        else:  # sign
            out["values"] = BufferSpec(torch.uint8, packed_bits_nbytes(count, 1))
            out["scales"] = BufferSpec(torch.float32, plan.nblocks)
        return out

    # -- encode ------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Encoded:
        if x.numel() == 0:
            return {k: torch.empty(0, dtype=b.dtype, device=x.device) for k, b in self.layout(tuple(x.shape)).items()}
        plan, kept, width = self._dims(tuple(x.shape))
        coeffs = dct.forward(x.detach().to(torch.float32), plan)  # (nb, bs)
        if not bool(torch.isfinite(coeffs).all()):
            # an intermediate product overflowed fp32 (inputs near its limit): transform in fp64, where it cannot;
            # the coefficients are saturated on the way to the wire below (rare path: the common one stays fp32)
            coeffs = dct.forward(x.detach().to(torch.float64), plan)
        if kept == plan.block_size:
            idx = None
            vals = coeffs  # (nb, bs), every coefficient in order
        else:
            top = torch.topk(coeffs.abs(), kept, dim=1, sorted=False).indices  # (nb, k)
            idx, _ = torch.sort(top, dim=1)
            vals = coeffs.gather(1, idx)  # (nb, k)
        enc: Encoded = {"indices": pack_uints(idx.reshape(-1), width) if idx is not None
                        else torch.empty(0, dtype=torch.uint8, device=x.device)}
        enc.update(self._encode_values(vals))
        return enc

    def _encode_values(self, vals: torch.Tensor) -> Encoded:
        """(nb, k) fp32 → value buffers."""
        if self.values in ("f16", "bf16", "f32"):
            return {"values": saturate(vals.reshape(-1), WIRE_DTYPES[self.values]).contiguous()}
        vals = saturate(vals, torch.float32)  # int8 and sign scale from the saturated coefficients
        if self.values == "int8":
            scale = vals.abs().amax(dim=1) / 127.0  # (nb,)
            q = torch.round(vals / scale.clamp_min(1e-30).unsqueeze(1)).clamp_(-127, 127)  # (nb, k)
            return {"values": q.to(torch.int8).view(torch.uint8).reshape(-1), "scales": scale}
        scale = saturate(vals.abs().mean(dim=1), torch.float32)  # (nb,); a mean of saturated values can round up
        return {"values": pack_bools((vals >= 0).reshape(-1)), "scales": scale}

    # -- decode / reduce -----------------------------------------------------------------------------
    def _sparse(self, enc: Encoded, plan: dct.BlockPlan, kept: int, width: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Buffers → (indices (nb, k) int64 or None for 'all in order', values (nb, k) fp32)."""
        nb, count = plan.nblocks, plan.nblocks * kept
        idx = None
        if kept != plan.block_size:
            idx = unpack_uints(enc["indices"], count, width).view(nb, kept)
        if self.values in ("f16", "bf16", "f32"):
            vals = enc["values"].to(torch.float32).view(nb, kept)
        elif self.values == "int8":
            q = enc["values"].view(torch.int8).to(torch.float32).view(nb, kept)
            vals = q * enc["scales"].to(torch.float32).unsqueeze(1)
        else:
            signs = unpack_bools(enc["values"], count).to(torch.float32).view(nb, kept) * 2 - 1
            vals = signs * enc["scales"].to(torch.float32).unsqueeze(1)
        return idx, vals

    def _accumulate(self, encs: Sequence[Encoded], shape: Shape, clip_ratio: float | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, dct.BlockPlan]:
        """Sum of scattered coefficients and per-coefficient pick counts, both (nb, bs) fp32. ``clip_ratio``: every
        value first clipped to ± clip_ratio × the median over payloads of its block's largest magnitude."""
        plan, kept, width = self._dims(shape)
        device = encs[0]["values"].device
        total = torch.zeros(plan.nblocks, plan.block_size, dtype=torch.float32, device=device)
        picks = torch.zeros_like(total)
        sparse = [self._sparse(enc, plan, kept, width) for enc in encs]
        if clip_ratio is not None:
            limit = median0(torch.stack([vals.abs().amax(dim=1) for _, vals in sparse])) * clip_ratio  # (nb,)
            limit = limit.unsqueeze(1)
            sparse = [(idx, torch.minimum(torch.maximum(vals, -limit), limit)) for idx, vals in sparse]
        for idx, vals in sparse:
            if idx is None:
                total.add_(vals)
                picks.add_(1.0)
            else:
                total.scatter_add_(1, idx, vals)
                picks.scatter_add_(1, idx, torch.ones_like(vals))
        return total, picks, plan

    def decode(self, enc: Encoded, shape: Shape) -> torch.Tensor:
        if numel_of(shape) == 0:
            return torch.zeros(shape, dtype=torch.float32, device=enc["values"].device)
        total, _, plan = self._accumulate([enc], shape)
        return dct.inverse(total, plan)

    def reduce(self, encs: Sequence[Encoded], shape: Shape) -> torch.Tensor:
        if not encs:
            raise ValueError("reduce needs at least one payload")
        if numel_of(shape) == 0:
            return self.decode(encs[0], shape)
        total, picks, plan = self._accumulate(encs, shape)
        if self.reduce_mode == "selector-mean":
            total = total / picks.clamp_min(1.0)
        else:
            total = total / len(encs)
        return dct.inverse(total, plan)

    def clipped_selector_mean(self, encs: Sequence[Encoded], shape: Shape, ratio: float) -> torch.Tensor:
        """Selector-mean after clipping every sent value to ± ``ratio`` × c_b, where c_b is the median over the
        payloads of block b's largest magnitude (for even n the mean of the two middle ones): a sender that puts its
        weight on a few coefficients — which selector-mean would keep at full value wherever nobody else picked
        them — is cut to what a typical sender's largest coefficient is. Each coefficient's sum is then divided by
        max(picks, ⌈n/2⌉) instead of its picks: a coefficient fewer than half of the senders chose counts as if
        the others had sent zero there, so one sender alone moves any coefficient by at most 1/⌈n/2⌉ of its
        clipped value (with the plain divisor, a lone picker's value went in whole: one member of 8 could move the
        aggregate by more than its norm, unflagged). fp32, ``shape``; lowband's variant of DeMo's selector-mean
        (arXiv 2411.19870), docs/algorithms.md §11. Raises ValueError for no payloads."""
        if not encs:
            raise ValueError("reduce needs at least one payload")
        if numel_of(shape) == 0:
            return self.decode(encs[0], shape)
        total, picks, plan = self._accumulate(encs, shape, clip_ratio=ratio)
        quorum = float(max(1, math.ceil(len(encs) / 2)))
        return dct.inverse(total / picks.clamp_min(quorum), plan)

    def norm(self, enc: Encoded, shape: Shape) -> float:
        """‖decode‖₂ (fp64) as the norm of the sent coefficients: the transform is orthonormal (Parseval)."""
        if numel_of(shape) == 0:
            return 0.0
        plan, kept, width = self._dims(shape)
        _, vals = self._sparse(enc, plan, kept, width)
        return float(vals.double().square().sum().sqrt())

    def magnitude_buffers(self, enc: Encoded) -> tuple[str, ...]:
        return ("scales",) if self.values in ("int8", "sign") else ("values",)

    def dots(self, encs: Sequence[Encoded], shape: Shape, other: torch.Tensor) -> list[float]:
        """In coefficient space: ⟨decode(enc), other⟩ = ⟨sent coefficients, DCT(other)⟩ (the transform is
        orthonormal), so ``other`` is transformed once instead of every payload inverted."""
        if numel_of(shape) == 0:
            return [0.0 for _ in encs]
        plan, kept, width = self._dims(shape)
        coeffs = dct.forward(other.double(), plan)  # (nb, bs)
        out = []
        for enc in encs:
            idx, vals = self._sparse(enc, plan, kept, width)
            picked = coeffs if idx is None else coeffs.gather(1, idx)
            out.append(float((vals.double() * picked).sum()))
        return out

    def validate(self, enc: Encoded, shape: Shape) -> None:
        super().validate(enc, shape)
        if numel_of(shape) == 0:
            return
        plan, kept, width = self._dims(shape)
        if kept != plan.block_size:
            idx = unpack_uints(enc["indices"], plan.nblocks * kept, width).view(plan.nblocks, kept)
            if bool((idx >= plan.block_size).any()):
                raise PayloadError(f"dct_topk: an index is ≥ the block size {plan.block_size}")
            if kept > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()):
                raise PayloadError("dct_topk: indices within a block are not strictly ascending (duplicate or unordered)")
        if self.values == "int8" and bool((enc["values"].view(torch.int8) == -128).any()):
            raise PayloadError("dct_topk: int8 value -128 is outside the symmetric range [-127, 127]")
        if "scales" in enc and bool((enc["scales"] < 0).any()):
            raise PayloadError("dct_topk: buffer 'scales' holds negative values")
