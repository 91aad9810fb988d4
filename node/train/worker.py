"""One worker's outer round, independent of how bytes travel.

    train H inner steps → Δ = θ_ref − θ (fp32) → x = scale·Δ → u = feedback(x) → codec.encode(u)
    → wire.pack → [transport] → wire.unpack every member's frame → codec.reduce (sorted by sender)
    → outer optimizer step on θ_ref with .grad = aggregate → load θ_ref into the model

Round outcomes:
- committed with this worker: feedback keeps u − transmitted; the outer step runs.
- committed without it (late/dropped upload): all of u stays in the feedback residual; the outer step
  runs on the others' aggregate so replicas stay identical. Recipes without feedback lose that work.
- not committed: nothing is applied and the model keeps training from where it is, so the next Δ
  covers both rounds and nothing is lost.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch

from node import wire
from node.compress import make_codec, make_feedback
from node.config import RunConfig
from node.errors import PayloadError
from node.outer import is_replica_consistent, make_outer
from node.tasks.base import Task
from node.train.inner import InnerLoop, InnerStats
from node.transport.base import RoundResult

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """What this worker offered for a round, kept until the round's outcome is known."""

    round: int
    deltas: list[torch.Tensor]  # Δ per tensor, fp32
    wanted: list[torch.Tensor]  # u per tensor (what feedback wanted to send)
    encoded: dict[str, dict[str, torch.Tensor]]
    frame: bytes
    inner_lr: float


@dataclass
class ApplyReport:
    committed: bool
    contributed: bool
    members: tuple[str, ...]
    rejected: dict[str, str]  # sender → reason


class Worker:
    def __init__(self, name: str, cfg: RunConfig, task: Task, shard: int, num_shards: int,
                 device: torch.device | str = "cpu") -> None:
        self.name, self.cfg, self.task = name, cfg, task
        self.device = torch.device(device)
        recipe = cfg.recipe
        self.model = task.build_model(cfg.seed).to(self.device)  # same seed: identical start everywhere
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.spec = wire.model_spec(list(zip(self.names, self.params)))
        self.ref = [p.detach().clone().float() for p in self.params]  # θ_ref: fp32 masters
        self.codec = make_codec(recipe.codec.name, recipe.codec.params)
        self.feedback = make_feedback(recipe.feedback_decay)
        self.outer = make_outer(recipe.outer.name, list(zip(self.names, self.ref)), recipe.outer.lr,
                                dict(recipe.outer.params))
        self.inner = InnerLoop(recipe.inner, task, self.model, task.batches(shard, num_shards, cfg.seed),
                               cfg.total_inner_steps, self.device)
        self.pending: Pending | None = None
        self.rounds_applied = 0

    @property
    def replica_consistent(self) -> bool:
        return is_replica_consistent(self.outer)

    # -- one round -----------------------------------------------------------------------------------
    def train(self) -> InnerStats:
        return self.inner.run(self.cfg.recipe.H)

    def _pseudo_gradients(self) -> list[torch.Tensor]:
        if self.inner.optimizer is None:  # 'grad' mode: no local step, the payload is the gradient
            return [p.grad.detach().float().clone() if p.grad is not None else torch.zeros_like(r)
                    for p, r in zip(self.params, self.ref)]
        return [r - p.detach().float() for r, p in zip(self.ref, self.params)]

    def prepare(self, round_: int, inner_lr: float) -> bytes:
        """Encode this round's update; returns the frame to submit."""
        scale = {"unit": 1.0, "inverse_inner_lr": 1.0 / inner_lr, "inner_lr": inner_lr}[self.cfg.recipe.payload_scale]
        deltas = self._pseudo_gradients()
        wanted, encoded = [], {}
        for name, delta in zip(self.names, deltas):
            u = self.feedback.compensate(name, delta * scale if scale != 1.0 else delta)
            wanted.append(u)
            encoded[name] = self.codec.encode(u)
        frame = wire.pack(self.cfg.run_id, round_, self.name, self.codec, self.spec, encoded)
        self.pending = Pending(round_, deltas, wanted, encoded, frame, inner_lr)
        return frame

    def _unpack_all(self, result: RoundResult) -> tuple[list[wire.Envelope], dict[str, str]]:
        good, rejected = [], {}
        for sender, frame in sorted(result.payloads.items()):
            try:
                env = wire.unpack(frame, self.codec, self.spec, self.cfg.run_id, result.round)
                if env.sender != sender:
                    raise PayloadError(f"frame names sender {env.sender!r} but came from {sender!r}")
                good.append(env)
            except PayloadError as exc:
                rejected[sender] = str(exc)
                log.warning("[node=%s round=%d] rejected payload from %s: %s", self.name, result.round, sender, exc)
        return good, rejected

    def apply(self, result: RoundResult) -> ApplyReport:
        pending = self.pending
        assert pending is not None and pending.round == result.round, "apply() must follow prepare() for that round"
        if not result.committed:
            self.pending = None
            return ApplyReport(False, False, (), {})
        envelopes, rejected = self._unpack_all(result)
        if not envelopes:
            self.pending = None
            return ApplyReport(False, False, (), rejected)
        members = tuple(e.sender for e in envelopes)
        contributed = self.name in members
        for name, u, enc in zip(self.names, pending.wanted, pending.encoded.values()):
            if contributed:
                self.feedback.commit(name, u, self.codec.decode(enc, tuple(u.shape)))
            else:
                self.feedback.keep(name, u)
        for i, (name, ref) in enumerate(zip(self.names, self.ref)):
            encs = [{k: v.to(self.device) for k, v in e.tensors[name].items()} for e in envelopes]
            ref.grad = self.codec.reduce(encs, tuple(ref.shape))
        self._outer_step(pending)
        self.pending = None
        self.rounds_applied += 1
        return ApplyReport(True, contributed, members, rejected)

    def _outer_step(self, pending: Pending) -> None:
        recipe = self.cfg.recipe
        lr = recipe.outer.lr * (pending.inner_lr if recipe.outer.lr_follows_inner else 1.0)
        for group in self.outer.param_groups:
            group["lr"] = lr
        if recipe.outer.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.ref, recipe.outer.clip_norm)
        set_context = getattr(self.outer, "set_round_context", None)
        if set_context is not None:
            residuals = [self.feedback.residuals.get(n, torch.zeros_like(r)) for n, r in zip(self.names, self.ref)]
            set_context(pending.deltas, residuals)
        self.outer.step()
        for ref, p in zip(self.ref, self.params):
            ref.grad = None
            with torch.no_grad():
                p.copy_(ref)

    # -- inspection ----------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Digest of the reference parameters: equal digests mean bit-identical replicas."""
        h = hashlib.sha256()
        for r in self.ref:
            h.update(r.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def payload_bytes(self) -> int:
        """Exact frame size of this worker's payload (the byte formula + envelope)."""
        return wire.expected_size(self.codec, self.spec, self.cfg.run_id, self.name)
