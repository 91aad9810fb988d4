"""The compressed downlink (``[rounds] result = "compressed"``): the round's aggregate re-encoded with the run's own
codec, with an error-feedback residual kept at the coordinator, so every member downloads one compressed payload per
round instead of every member's frame (relay) or one dense frame (``result = "aggregate"``).

Bidirectional compression with error feedback on both sides, as in DoubleSqueeze (Tang et al., "DoubleSqueeze:
Parallel Stochastic Gradient Descent with Double-Pass Error-Compensated Compression", arXiv 1905.05957): the members
compress their pseudo-gradients with their own error feedback (node/compress/feedback.py), the coordinator reduces them
to A_t (per tensor, fp32) and compresses again, with a residual e of its own::

    Q_t     = C(A_t + e_t)              # the run's codec (sign → 1 bit + scale, top-k, ...)
    e_{t+1} = A_t + e_t − D(Q_t)        # plain residual: no decay
    θ_{t+1} = OuterStep(θ_t, D(Q_t))    # on the coordinator and on every member alike

The residual is *not* decayed (whatever the recipe's uplink ``feedback_decay``): DoubleSqueeze's server-side error is a
plain residual, and with it Σ_t D(Q_t) = Σ_t A_t − e_T, so nothing the members agreed on is lost, only delayed. The
uplink decay of SparseLoCo (arXiv 2508.15706) plays the role of a momentum on each member's own update; the downlink
residual holds the *agreed* update not yet sent, and decaying it would drop agreed progress.

Everything here is deterministic CPU fp32 arithmetic on the validated frames in sender order, so a restart that
replays a round from its frames computes the same Q and the same residual (docs/state.md).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from node.compress import Codec, Encoded, make_codec
from node.errors import PayloadError

#: the dense codecs of ``result = "aggregate"`` (``[rounds] aggregate_codec``): they take no parameters
DENSE_AGGREGATE_CODECS = ("identity", "bf16", "fp16")


def compress_with_feedback(codec: Codec, names: Sequence[str], aggregate: Sequence[torch.Tensor],
                           residual: Sequence[torch.Tensor]) -> tuple[dict[str, Encoded], list[torch.Tensor]]:
    """One downlink encode: per tensor, Q = C(A + e) with ``codec`` and e ← (A + e) − D(Q), in place.

    ``aggregate``: A, one fp32 tensor per trainable tensor (model order, each of its tensor's shape); ``residual``:
    e, fp32 tensors of the same shapes, updated in place (the caller's copy of the state: the coordinator runs this on
    its scratch reference, so a failed commit leaves the live residual as it was). Returns (tensor name → Q's buffers,
    D(Q) per tensor in model order, fp32). Values beyond the codec's wire range are saturated (``Codec.fit``) and the
    excess stays in e. Raises FloatingPointError if e became non-finite (never for validated, finite frames)."""
    encoded: dict[str, Encoded] = {}
    decoded: list[torch.Tensor] = []
    for name, a, e in zip(names, aggregate, residual, strict=True):
        # in place, one dense allocation per tensor (D(Q)): at 300M parameters every extra temporary is 1.2 GB of
        # fresh pages, and first-touching them cost more than the arithmetic (BENCHMARKS.md, the commit path)
        e.add_(a.to(e.device, torch.float32))  # e ← A + e, the target, (shape) fp32 (fp32 addition commutes exactly)
        enc = codec.encode(codec.fit(e))
        enc = {k: v.clone() if _shares_storage(v, e) else v for k, v in enc.items()}  # a dense codec's Q may be e
        dec = codec.decode(enc, tuple(e.shape))  # D(Q), (shape) fp32
        e.sub_(dec)  # e ← (A + e) − D(Q)
        if not math.isfinite(float(e.sum(dtype=torch.float64))):  # one pass, no mask: a NaN or ±inf propagates
            raise FloatingPointError(f"downlink residual of {name!r} is not finite")
        encoded[name] = enc
        decoded.append(dec)
    return encoded, decoded


def _shares_storage(t: torch.Tensor, other: torch.Tensor) -> bool:
    return t.untyped_storage().data_ptr() == other.untyped_storage().data_ptr()


def aggregate_codec(name: str, run_codec: Codec) -> Codec:
    """The codec an aggregate frame is validated and decoded with, from the name the coordinator sent with it
    (``CollectHeader.aggregate_codec``: input from the network). The run's own codec name means a compressed downlink:
    the run's codec with the run's parameters (the frame must carry exactly those, ``wire.unpack``); a dense name is
    ``result = "aggregate"``. Anything else raises PayloadError."""
    if name == run_codec.name:
        return run_codec
    if name in DENSE_AGGREGATE_CODECS:
        return make_codec(name)
    shown = name if len(name) <= 40 and name.isprintable() else repr(name[:40]) + "…"
    raise PayloadError(f"aggregate codec {shown!r} is neither this run's codec {run_codec.name!r} nor a dense one "
                       f"({', '.join(DENSE_AGGREGATE_CODECS)})")
