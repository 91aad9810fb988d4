"""Dense passthrough codecs: fp32 (``identity``), ``bf16`` and ``fp16``. The DiLoCo/DSM wire format."""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from node.compress.base import WIRE_LIMIT, BufferSpec, Codec, Encoded, Shape, numel_of


class DenseCodec(Codec):
    """Sends every element at a fixed float precision."""

    name: ClassVar[str] = "identity"
    wire_dtype: ClassVar[torch.dtype] = torch.float32

    def params(self) -> dict[str, Any]:
        return {}

    def layout(self, shape: Shape) -> dict[str, BufferSpec]:
        return {"values": BufferSpec(self.wire_dtype, numel_of(shape))}

    def encode(self, x: torch.Tensor) -> Encoded:
        values = x.detach().reshape(-1).to(self.wire_dtype)
        if not bool(torch.isfinite(values).all()):
            # fp16 overflows at 65504; saying so here beats a receiver rejecting the payload later
            raise ValueError(f"{self.name}: tensor has values that are not finite at this precision")
        return {"values": values.contiguous()}

    def fit(self, x: torch.Tensor) -> torch.Tensor:
        """Clamp to the wire range (fp16: ±65504; fp32, bf16: just below ±1e30); in-range values are unchanged."""
        limit = WIRE_LIMIT[self.wire_dtype]
        return x.clamp(-limit, limit)

    def wire_limit(self) -> float:
        return WIRE_LIMIT[self.wire_dtype]

    def decode(self, enc: Encoded, shape: Shape) -> torch.Tensor:
        return enc["values"].to(torch.float32).reshape(shape)

    def norm(self, enc: Encoded, shape: Shape) -> float:
        """‖values‖₂ (fp64)."""
        return float(enc["values"].double().square().sum().sqrt())

    def magnitude_buffers(self, enc: Encoded) -> tuple[str, ...]:
        return ("values",)


class Bf16Codec(DenseCodec):
    name: ClassVar[str] = "bf16"
    wire_dtype: ClassVar[torch.dtype] = torch.bfloat16


class Fp16Codec(DenseCodec):
    name: ClassVar[str] = "fp16"
    wire_dtype: ClassVar[torch.dtype] = torch.float16
