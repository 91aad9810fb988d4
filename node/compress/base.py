"""The codec seam: how one tensor becomes a few raw buffers and back, and how many are combined.

A codec is stateless and deterministic. It describes the exact buffers it produces for a tensor shape
(``layout``), which lets the wire layer check sizes *before* it allocates anything and makes the byte
formula of every codec exact by construction. Error feedback is a separate wrapper (``feedback.py``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from node.errors import PayloadError

Shape = tuple[int, ...]
#: buffer name → 1-D tensor whose dtype and length match the codec's layout for the tensor's shape
Encoded = dict[str, torch.Tensor]

#: Largest magnitude any float buffer may carry. Honest pseudo-gradients are many orders smaller; the
#: bound keeps every decode and every reduce of up to millions of payloads finite in fp32.
MAX_MAGNITUDE = 1e30

_ITEMSIZE = {torch.uint8: 1, torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}
WIRE_DTYPES: dict[str, torch.dtype] = {"u8": torch.uint8, "f16": torch.float16, "bf16": torch.bfloat16,
                                       "f32": torch.float32}


@dataclass(frozen=True)
class BufferSpec:
    """One raw buffer: its element type and exact element count."""

    dtype: torch.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * _ITEMSIZE[self.dtype]


def numel_of(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _wire_limit(dtype: torch.dtype) -> float:
    """The largest magnitude of ``dtype`` that is ≤ MAX_MAGNITUDE (fp16: 65504; fp32 and bf16: just below 1e30).
    The cast of 1e30 itself rounds *up* in fp32 and bf16, past what receivers accept, hence the step down."""
    top = torch.tensor(min(MAX_MAGNITUDE, torch.finfo(dtype).max), dtype=torch.float64).to(dtype)
    while float(top) > MAX_MAGNITUDE:
        top = torch.nextafter(top, torch.zeros((), dtype=dtype))
    return float(top)


#: per wire float type, the largest magnitude a codec puts on the wire (saturation bound)
WIRE_LIMIT: dict[torch.dtype, float] = {d: _wire_limit(d) for d in (torch.float16, torch.bfloat16, torch.float32)}


def saturate(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (fp32 or fp64, finite or ±inf from an intermediate overflow) cast to the wire ``dtype`` with every
    magnitude above ``WIRE_LIMIT[dtype]`` clamped to it: a codec's floats are never ±inf and always pass
    ``check_floats``. In-range values are cast exactly as a plain ``.to(dtype)`` would (clamping them is a no-op), so
    codec outputs are bit-identical to an unsaturated cast wherever no value is out of range. The caller's error
    feedback keeps what saturation cut off (docs/algorithms.md, §5, range)."""
    limit = WIRE_LIMIT[dtype]
    return x.clamp(-limit, limit).to(dtype)


def check_floats(enc: Encoded, codec: str) -> None:
    """Every float buffer finite and within ±MAX_MAGNITUDE; raises PayloadError naming the buffer."""
    for key, buf in enc.items():
        if not buf.is_floating_point() or buf.numel() == 0:
            continue
        if not bool(torch.isfinite(buf).all()):
            raise PayloadError(f"{codec}: buffer {key!r} holds non-finite values")
        if float(buf.abs().max()) > MAX_MAGNITUDE:
            raise PayloadError(f"{codec}: buffer {key!r} holds a magnitude above {MAX_MAGNITUDE:g}")


def sorted0(x: torch.Tensor) -> torch.Tensor:
    """``x`` (shape ``(n, ...)``) sorted along dim 0, ascending: exact (the same values whatever the order of the
    rows). Up to 16 rows by an odd-even transposition network of elementwise min/max (several times faster than
    ``torch.sort`` across rows), beyond that by ``torch.sort``; both give the same tensor."""
    n = x.shape[0]
    if n > 16:
        return x.sort(dim=0).values
    rows = list(x.unbind(0))
    for phase in range(n):
        for j in range(phase % 2, n - 1, 2):
            rows[j], rows[j + 1] = torch.minimum(rows[j], rows[j + 1]), torch.maximum(rows[j], rows[j + 1])
    return torch.stack(rows) if rows else x.clone()


def median0(x: torch.Tensor) -> torch.Tensor:
    """The median over dim 0 of ``x`` (shape ``(n, ...)``, n ≥ 1) → shape ``(...)``, same dtype: the middle value of
    the sorted column, or for even n the mean of the two middle ones. Sorting makes it exact and independent of the
    order of the rows (every replica gets the same bits)."""
    s = sorted0(x)
    n = s.shape[0]
    return s[n // 2].clone() if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


class Codec(ABC):
    """Turns an fp32 tensor into buffers (``encode``), back (``decode``), and combines many (``reduce``)."""

    name: ClassVar[str]
    version: ClassVar[int] = 1

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Parameters that change the bytes or their meaning; sent in the envelope, part of the config hash."""

    @abstractmethod
    def layout(self, shape: Shape) -> dict[str, BufferSpec]:
        """The exact buffers ``encode`` produces for a tensor of ``shape``."""

    @abstractmethod
    def encode(self, x: torch.Tensor) -> Encoded:
        """fp32 tensor (any shape, any device) → buffers on the same device."""

    def fit(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` brought into what ``encode`` carries: every finite fp32 input leaves ``encode(fit(x))`` finite and
        within the wire bound. Codecs that saturate inside ``encode`` (sign, DCT-top-k) return ``x``; dense codecs,
        whose ``encode`` is a plain cast that refuses out-of-range values, clamp here. What is cut off is the caller's
        to keep (error feedback: ``e = u − decode(encode(fit(u)))``)."""
        return x

    def wire_limit(self) -> float:
        """The largest magnitude this codec can put on the wire: where it saturates. 65504 for any configuration with
        an f16 buffer; just below MAX_MAGNITUDE otherwise. A run whose codec saturates at 65504 needs error feedback
        to carry the excess (checked at start-up, ``Reference``)."""
        return WIRE_LIMIT[torch.float32]

    @abstractmethod
    def decode(self, enc: Encoded, shape: Shape) -> torch.Tensor:
        """Buffers → the fp32 tensor they stand for (what the receiver reconstructs)."""

    def reduce(self, encs: Sequence[Encoded], shape: Shape) -> torch.Tensor:
        """Combine the payloads of several workers into one fp32 tensor; default: mean of decodes.

        Callers pass payloads in a fixed order (by sender) so every replica gets bit-identical results.
        """
        if not encs:
            raise ValueError("reduce needs at least one payload")
        total = self.decode(encs[0], shape).clone()
        for enc in encs[1:]:
            total.add_(self.decode(enc, shape))
        return total.div_(len(encs))

    @property
    def accumulates(self) -> bool:
        """Whether ``reduce`` is the mean of the decodes added in the given order, so that it can be taken payload
        by payload as they arrive (``accumulate`` each, then ``finish``) with the same bits. Codecs whose reduce is
        another rule (a vote, a selector mean) say False and are reduced all at once."""
        return type(self).reduce is Codec.reduce

    def accumulate(self, total: torch.Tensor | None, enc: Encoded, shape: Shape) -> torch.Tensor:
        """``reduce``'s running sum with one more payload: the first payload's decode (``total`` None), else
        ``total`` + its decode, in place. fp32, flat or ``shape``; only where ``accumulates``."""
        if total is None:
            return self.decode(enc, shape).clone()
        return total.add_(self.decode(enc, shape))

    def finish(self, total: torch.Tensor, count: int, shape: Shape) -> torch.Tensor:
        """The mean from ``count`` accumulated payloads: a new fp32 tensor of ``shape`` (``total`` is left as it is,
        so a commit that fails can finish again); ``total / count`` is the same division as ``reduce``'s."""
        return (total / count).reshape(shape)

    def norm(self, enc: Encoded, shape: Shape) -> float:
        """The L2 norm of what ``enc`` decodes to (fp64 arithmetic, returned as a Python float), computed in the
        codec's own representation where that is cheaper than decoding. Used to bound one sender's influence
        (node/robust/bounds.py). ``enc``'s contents must have been validated (finite)."""
        return float(self.decode(enc, shape).double().square().sum().sqrt())

    def dots(self, encs: Sequence[Encoded], shape: Shape, other: torch.Tensor) -> list[float]:
        """⟨decode(enc), other⟩ for each payload (fp64 arithmetic, Python floats); ``other``: fp32 of ``shape``. For
        reports (the cosine of a member's payload to the aggregate), not for decisions."""
        wide = other.double()
        return [float((self.decode(enc, shape).double() * wide).sum()) for enc in encs]

    def scaled(self, enc: Encoded, shape: Shape, factor: float) -> Encoded:
        """A payload that decodes to ``factor`` × what ``enc`` decodes to (0 ≤ factor ≤ 1: a clip), in the codec's
        own representation: the float buffer(s) that carry magnitude multiplied by ``factor`` in fp32, everything
        else shared with ``enc``. Such a payload is for ``reduce`` and ``decode`` only: its float buffers may be fp32
        where the wire carries f16 or bf16, so it is never packed. ``factor`` 1 returns ``enc`` itself."""
        if factor == 1.0:
            return enc
        return {key: (buf.to(torch.float32) * factor if key in self.magnitude_buffers(enc) else buf)
                for key, buf in enc.items()}

    def magnitude_buffers(self, enc: Encoded) -> tuple[str, ...]:
        """The buffers whose values scale the decoded tensor linearly (what ``scaled`` multiplies)."""
        raise NotImplementedError(f"codec {self.name!r} does not say which buffers carry magnitude")

    def nbytes(self, shape: Shape) -> int:
        """Exact payload bytes for one tensor (the byte formula)."""
        return sum(spec.nbytes for spec in self.layout(shape).values())

    def validate(self, enc: Encoded, shape: Shape) -> None:
        """Check buffer contents from outside (lengths were checked by the wire); raise PayloadError."""
        check_floats(enc, self.name)

    def describe(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in sorted(self.params().items()))
        return f"{self.name}({args})"
