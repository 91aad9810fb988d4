"""The reference state θ_ref and how a committed round changes it; shared by workers and the coordinator.

Both sides run exactly this code on the same frames in the same (sorted-by-sender) order, so for the
replica-consistent recipes every worker and the coordinator hold bit-identical parameters, which the
published fingerprint checks. θ_ref and the outer optimizer live in fp32 on ``device`` (CPU by default:
the same arithmetic everywhere, whatever accelerator the inner loop uses).
"""
from __future__ import annotations

import hashlib
import io
import logging
from typing import Any, Sequence

import torch

from node import wire
from node.compress import make_codec
from node.config import RunConfig
from node.errors import PayloadError
from node.outer import is_replica_consistent, make_outer
from node.train.schedule import round_inner_lr

log = logging.getLogger(__name__)
AGGREGATE_SENDER = "coordinator"


def tensors_fingerprint(tensors: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def model_digest(spec: wire.ModelSpec) -> str:
    """Names and shapes of the model's tensors: two models with equal digests take each other's payloads."""
    text = ";".join(f"{t.name}:{'x'.join(map(str, t.shape))}" for t in spec)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Reference:
    def __init__(self, cfg: RunConfig, named: Sequence[tuple[str, torch.Tensor]], device: str | torch.device = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.names = [n for n, _ in named]
        self.spec = wire.model_spec(named)
        self.tensors = [t.detach().to(self.device, torch.float32).clone() for _, t in named]  # θ_ref, fp32
        recipe = cfg.recipe
        self.codec = make_codec(recipe.codec.name, recipe.codec.params)
        self.outer = make_outer(recipe.outer.name, list(zip(self.names, self.tensors)), recipe.outer.lr,
                                dict(recipe.outer.params))
        self.committed_rounds = 0  # rounds applied so far; the next round to apply has this number

    @property
    def replica_consistent(self) -> bool:
        return is_replica_consistent(self.outer)

    def inner_lr(self, round_: int) -> float:
        r, total = self.cfg.recipe, self.cfg.total_inner_steps
        return round_inner_lr(r.inner.lr, r.inner.warmup_steps, total, r.inner.min_lr_ratio, r.H, round_)

    def unpack(self, frames: dict[str, bytes], round_: int) -> tuple[list[wire.Envelope], dict[str, str]]:
        """Validate every member's frame (sorted by sender); invalid ones are dropped with a reason.

        Validation is deterministic, so every replica drops the same frames and stays identical.
        """
        good, rejected = [], {}
        for sender, frame in sorted(frames.items()):
            try:
                env = wire.unpack(frame, self.codec, self.spec, self.cfg.run_id, round_)
                if env.sender != sender:
                    raise PayloadError(f"frame names sender {env.sender!r} but came from {sender!r}")
                good.append(env)
            except PayloadError as exc:
                rejected[sender] = str(exc)
        return good, rejected

    def reduce(self, envelopes: Sequence[wire.Envelope]) -> list[torch.Tensor]:
        """The codec's reduce of the envelopes (sorted by sender), per tensor, fp32."""
        assert envelopes, "reduce() needs at least one payload"
        assert [e.sender for e in envelopes] == sorted(e.sender for e in envelopes), "reduce order must be sorted"
        out = []
        for name, ref in zip(self.names, self.tensors):
            encs = [{k: v.to(self.device) for k, v in e.tensors[name].items()} for e in envelopes]
            out.append(self.codec.reduce(encs, tuple(ref.shape)))
        return out

    def apply(self, envelopes: Sequence[wire.Envelope], round_: int,
              local_context: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None) -> None:
        """One outer step on θ_ref with .grad = the codec's reduce of the envelopes (sorted by sender)."""
        self.step(self.reduce(envelopes), round_, local_context)

    def step(self, aggregate: Sequence[torch.Tensor], round_: int,
             local_context: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None) -> None:
        """The outer step of round ``round_`` with .grad = ``aggregate`` (one tensor per parameter)."""
        for ref, agg in zip(self.tensors, aggregate, strict=True):
            ref.grad = agg.to(self.device, torch.float32)
        recipe = self.cfg.recipe
        lr = recipe.outer.lr * (self.inner_lr(round_) if recipe.outer.lr_follows_inner else 1.0)
        for group in self.outer.param_groups:
            group["lr"] = lr
        if recipe.outer.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.tensors, recipe.outer.clip_norm)
        set_context = getattr(self.outer, "set_round_context", None)
        if set_context is not None:
            if local_context is None:
                raise ValueError(f"outer optimizer {recipe.outer.name!r} needs this worker's Δ and residuals")
            set_context(*local_context)
        self.outer.step()
        for ref in self.tensors:
            ref.grad = None
        self.committed_rounds = round_ + 1

    # -- aggregate results (coordinator-side reduce) ------------------------------------------------
    def pack_aggregate(self, aggregate: Sequence[torch.Tensor], round_: int, codec_name: str) -> tuple[bytes, list[torch.Tensor]]:
        """Encode an aggregate for the wire with a dense codec; returns the frame and what it decodes to.

        Whoever applies an aggregate applies the *decoded* one, so the sender and every receiver take the
        same step even when the wire precision (bf16) is lower than fp32.
        """
        codec = make_codec(codec_name)
        encoded = {name: codec.encode(agg) for name, agg in zip(self.names, aggregate)}
        frame = wire.pack(self.cfg.run_id, round_, AGGREGATE_SENDER, codec, self.spec, encoded)
        return frame, [codec.decode(encoded[n], tuple(a.shape)) for n, a in zip(self.names, aggregate)]

    def unpack_aggregate(self, frame: bytes, round_: int, codec_name: str) -> list[torch.Tensor]:
        """Validate an aggregate frame; raises PayloadError."""
        codec = make_codec(codec_name)
        env = wire.unpack(frame, codec, self.spec, self.cfg.run_id, round_)
        if env.sender != AGGREGATE_SENDER:
            raise PayloadError(f"aggregate frame names sender {env.sender!r}, expected {AGGREGATE_SENDER!r}")
        return [codec.decode(env.tensors[n], tuple(t.shape)) for n, t in zip(self.names, self.tensors)]

    def fingerprint(self) -> str:
        return tensors_fingerprint(self.tensors)

    # -- state for joiners and checkpoints -----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The live tensors (no copies, like torch's own state dicts): callers that keep it while training goes on
        detach a copy (the daemon's checkpoint does)."""
        return {"committed_rounds": self.committed_rounds, "names": list(self.names),
                "tensors": [t.detach().cpu() for t in self.tensors], "outer": self.outer.state_dict(),
                "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise ValueError("state holds different tensors than this model")
        for ref, t in zip(self.tensors, state["tensors"]):
            if tuple(t.shape) != tuple(ref.shape):
                raise ValueError(f"state tensor of shape {tuple(t.shape)} does not fit {tuple(ref.shape)}")
            ref.data.copy_(t.to(self.device, torch.float32))
        self.outer.load_state_dict(state["outer"])
        self.committed_rounds = int(state["committed_rounds"])
        if self.fingerprint() != state["fingerprint"]:
            raise ValueError("state fingerprint mismatch after loading (corrupted state)")

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        return buf.getvalue()

    def load_bytes(self, blob: bytes) -> None:
        # weights_only: a state blob comes from the network and must never run code when loaded
        try:
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"state blob is not a valid lowband state: {type(exc).__name__}: {exc}") from None
        self.load_state_dict(state)
