"""One worker's outer round, independent of how bytes travel.

    train H inner steps → Δ = θ_ref − θ (fp32) → x = scale·Δ → u = feedback(x) → codec.encode(u)
    → wire.pack → [transport] → Reference.unpack every member's frame → Reference.apply (reduce sorted
    by sender, outer step on θ_ref) → load θ_ref into the model

Round outcomes:
- committed with this worker: feedback keeps u − transmitted; the outer step runs.
- committed without it (late/dropped upload): all of u stays in the feedback residual; the outer step
  runs on the others' aggregate so replicas stay identical. Recipes without feedback lose that work.
- not committed: nothing is applied; the pending frame is kept and the daemon offers it again for the same round
  (every peer and the coordinator must see the same bytes for a round). Steps trained meanwhile are not in it:
  without overlap they are dropped when the round commits and θ_ref is loaded; with overlap the shift below
  keeps them.

Overlapped rounds (``recipe.overlap``; the daemon and the simulator drive them the same way):

    train round r+1 (while round r's frames travel) → apply round r → prepare round r+1 → ...

Round r's result is applied after round r+1's inner steps, at the round boundary, never in the middle of them:
the trajectory then does not depend on when the bytes happened to arrive, so the quality benchmark measures
exactly what a node does. Applying it moves θ_ref from θ_ref_r to θ_ref_{r+1} and shifts the local model by

    θ ← θ + (θ_ref_{r+1} − θ_ref_r) + Δ_r        (= θ_ref_{r+1} + the progress made in round r+1)

because θ_ref_r − Δ_r is exactly where round r ended locally (Δ_r = θ_ref_r − θ at prepare time). Round r+1's Δ
is then θ_ref_{r+1} − θ = −(progress in round r+1), as without overlap. θ_ref — what the fingerprint covers —
follows the same outer steps as without overlap, one round later, so replicas stay identical. The cost is
staleness: round r+1's inner steps start from a point that does not yet include the others' round-r updates.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from node import wire
from node.compress import make_feedback
from node.config import RunConfig
from node.errors import PayloadError
from node.tasks.base import Task, build_seeded
from node.train.inner import InnerLoop, InnerStats
from node.train.reference import Reference
from node.transport.messages import RoundResult

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """What this worker offered for a round, kept until the round's outcome is known."""

    round: int
    deltas: list[torch.Tensor]  # Δ per tensor, fp32
    wanted: list[torch.Tensor]  # u per tensor (what feedback wanted to send)
    encoded: dict[str, dict[str, torch.Tensor]]
    frame: bytes


@dataclass
class ApplyReport:
    committed: bool
    contributed: bool
    members: tuple[str, ...]
    rejected: dict[str, str]  # sender → reason


class Worker:
    def __init__(self, name: str, cfg: RunConfig, task: Task, shard: int, num_shards: int,
                 device: torch.device | str = "cpu", reference_device: torch.device | str = "cpu") -> None:
        self.name, self.cfg, self.task = name, cfg, task
        self.device = torch.device(device)
        recipe = cfg.recipe
        self.model = build_seeded(task, cfg.seed).to(self.device)  # same seed: identical start everywhere
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.reference = Reference(cfg, named, reference_device)
        self.names, self.spec, self.codec = self.reference.names, self.reference.spec, self.reference.codec
        self.feedback = make_feedback(recipe.feedback_decay)
        self.inner = InnerLoop(recipe.inner, task, self.model, task.batches(shard, num_shards, cfg.seed),
                               cfg.total_inner_steps, self.device)
        self.pending: Pending | None = None

    @property
    def ref(self) -> list[torch.Tensor]:
        return self.reference.tensors

    @property
    def outer(self) -> torch.optim.Optimizer:
        return self.reference.outer

    @property
    def replica_consistent(self) -> bool:
        return self.reference.replica_consistent

    # -- one round -----------------------------------------------------------------------------------
    def train(self) -> InnerStats:
        return self.inner.run(self.cfg.recipe.H)

    def _pseudo_gradients(self) -> list[torch.Tensor]:
        if self.inner.optimizer is None:  # 'grad' mode: no local step, the payload is the gradient
            return [p.grad.detach().float().to(r.device) if p.grad is not None else torch.zeros_like(r)
                    for p, r in zip(self.params, self.ref)]
        return [r - p.detach().float().to(r.device) for r, p in zip(self.ref, self.params)]

    def prepare(self, round_: int, inner_lr: float | None = None) -> bytes:
        """Encode this round's update (η_t defaults to the round's scheduled lr); returns the frame."""
        eta = self.reference.inner_lr(round_) if inner_lr is None else inner_lr
        scale = {"unit": 1.0, "inverse_inner_lr": 1.0 / eta, "inner_lr": eta}[self.cfg.recipe.payload_scale]
        deltas = self._pseudo_gradients()
        wanted, encoded = [], {}
        for name, delta in zip(self.names, deltas):
            u = self.feedback.compensate(name, delta * scale if scale != 1.0 else delta)
            wanted.append(u)
            encoded[name] = self.codec.encode(u)
        frame = wire.pack(self.cfg.run_id, round_, self.name, self.codec, self.spec, encoded)
        self.pending = Pending(round_, deltas, wanted, encoded, frame)
        return frame

    def apply(self, result: RoundResult) -> ApplyReport:
        pending = self.pending
        assert pending is not None and pending.round == result.round, "apply() must follow prepare() for that round"
        if not result.committed:
            # kept: the round is offered again with this same frame (peers that already hold it, or a coordinator
            # that accepted it, must see the same bytes), so the round's outcome is the same whichever copy counts
            return ApplyReport(False, False, (), {})
        self.pending = None
        rejected: dict[str, str] = {}
        if result.aggregate is not None:
            try:
                aggregate = self.reference.unpack_aggregate(result.aggregate, result.round, result.aggregate_codec)
            except PayloadError as exc:
                log.error("[node=%s round=%d] rejected the aggregate: %s", self.name, result.round, exc)
                return ApplyReport(False, False, (), {"coordinator": str(exc)})
            members = tuple(result.aggregate_members)
        else:
            envelopes, rejected = self.reference.unpack(result.payloads, result.round)
            for sender, reason in rejected.items():
                log.warning("[node=%s round=%d] rejected payload from %s: %s", self.name, result.round, sender, reason)
            if not envelopes:
                return ApplyReport(False, False, (), rejected)
            members = tuple(e.sender for e in envelopes)
            aggregate = self.reference.reduce(envelopes)
        contributed = self.name in members
        before = [r.detach().clone() for r in self.ref] if self.cfg.recipe.overlap else None
        for name, u, enc in zip(self.names, pending.wanted, pending.encoded.values()):
            if contributed:
                self.feedback.commit(name, u, self.codec.decode(enc, tuple(u.shape)))
            else:
                self.feedback.keep(name, u)
        residuals = [self.feedback.residuals.get(n, torch.zeros_like(r)) for n, r in zip(self.names, self.ref)]
        self.reference.step(aggregate, result.round, (pending.deltas, residuals))
        if before is None:
            self.load_reference_into_model()
        else:
            self._shift_local(before, pending.deltas)
        return ApplyReport(True, contributed, members, rejected)

    def apply_observed(self, result: RoundResult, keep_local_progress: bool = False) -> bool:
        """Apply a committed round this worker did not take part in (catching up after a state download, or
        skipping a round to get back in step). Error feedback is untouched. False when the round cannot be
        applied from its result alone (nothing valid in it, or an outer rule that needs this worker's own Δ).

        ``keep_local_progress``: the round was observed while this worker already trained the next one from θ_ref
        (overlap, see the module docstring; its Δ for the observed round is 0), so the local model moves by the
        outer step, θ ← θ + (θ_ref_new − θ_ref_old), instead of being reset to θ_ref."""
        if not result.committed:
            return False
        if result.aggregate is not None:
            try:
                aggregate = self.reference.unpack_aggregate(result.aggregate, result.round, result.aggregate_codec)
            except PayloadError as exc:
                log.error("[node=%s round=%d] rejected the aggregate: %s", self.name, result.round, exc)
                return False
        else:
            envelopes, _rejected = self.reference.unpack(result.payloads, result.round)
            if not envelopes:
                return False
            aggregate = self.reference.reduce(envelopes)
        if getattr(self.outer, "set_round_context", None) is not None:
            return False  # the faithful decoupled rule mixes in this worker's own Δ: there is none for this round
        self.pending = None
        before = [r.detach().clone() for r in self.ref] if keep_local_progress else None
        self.reference.step(aggregate, result.round)
        if before is None:
            self.load_reference_into_model()
        else:
            self._shift_local(before, None)
        return True

    def _shift_local(self, before: list[torch.Tensor], deltas: list[torch.Tensor] | None) -> None:
        """Overlap: θ ← θ + (θ_ref_new − θ_ref_old) + Δ_r, keeping the progress made since round r ended
        (``deltas`` None: Δ_r = 0, a round this worker only observed)."""
        with torch.no_grad():
            for i, (p, new, old) in enumerate(zip(self.params, self.ref, before)):
                step = new - old if deltas is None else new - old + deltas[i]
                p.add_(step.to(p.device, p.dtype))

    @contextlib.contextmanager
    def reference_weights(self) -> Iterator[torch.nn.Module]:
        """The model holding θ_ref for a while (evaluation), then the local weights back."""
        saved = [p.detach().clone() for p in self.params]
        self.load_reference_into_model()
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def load_reference_into_model(self) -> None:
        with torch.no_grad():
            for ref, p in zip(self.ref, self.params):
                p.copy_(ref)

    # -- inspection and persistence ----------------------------------------------------------------
    def fingerprint(self) -> str:
        """Digest of the reference parameters: equal digests mean bit-identical replicas."""
        return self.reference.fingerprint()

    def payload_bytes(self) -> int:
        """Exact frame size of this worker's payload (the byte formula + envelope)."""
        return wire.expected_size(self.codec, self.spec, self.cfg.run_id, self.name)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this worker exactly: θ_ref + outer, inner optimizer, feedback."""
        return {"reference": self.reference.state_dict(), "inner": self.inner.state_dict(),
                "feedback": self.feedback.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference.load_state_dict(state["reference"])
        self.inner.load_state_dict(state["inner"])
        self.feedback.load_state_dict(state["feedback"])
        self.load_reference_into_model()

    def adopt_global_state(self, blob: bytes) -> None:
        """Take the run's reference state (a joiner, or a replica whose fingerprint diverged)."""
        self.reference.load_bytes(blob)
        self.inner.step = self.reference.committed_rounds * self.cfg.recipe.H  # the schedule follows the run
        self.load_reference_into_model()
