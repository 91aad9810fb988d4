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

Buffers (docs/algorithms.md, §10) ride along: each frame carries the sender's buffer values, the round sets the
reference buffers to their agreed value (mean or max) and the model takes them like θ_ref — or, with overlap,
shifts by (agreed − what it sent), as parameters do.

Signed frames and bounds: a worker with a key (node/identity.py) signs its frames, and verifies the others' when the
round's result carries the members' keys (``RoundResult.member_keys``). With a recipe's ``reduce`` on, the round's
report says what the bounds did to each frame: a frame of ours the bounds rejected counts as not taken (all of u stays
in the residual), a clipped one as taken at its clip factor (e ← u − f·decode(sent), per tensor).

Poisoned local state: a worker whose Δ, fp32 masters, inner moments or buffers hold NaN/inf at prepare time (inner
steps with a non-finite loss or gradient are skipped before that, node/train/inner.py) resets its local state from
θ_ref (fresh inner moments) and sends Δ = 0 for that round — its frame stays valid, so it stays in the round, and
it trains normally from the next one. A non-finite error-feedback residual is dropped the same way. Nothing
non-finite reaches a frame or the reference.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from node import wire
from node.compress import make_feedback
from node.config import RunConfig
from node.errors import PayloadError
from node.identity import NodeKey
from node.keyring import KeyRing
from node.tasks.base import Task, build_seeded
from node.train import tensors as model_tensors
from node.train.inner import InnerLoop, InnerStats
from node.train.reference import Aggregate, Reference
from node.transport.messages import RoundResult

if TYPE_CHECKING:
    from node.train.external import ExternalInner
    from node.train.local_group import LocalGroup

log = logging.getLogger(__name__)
#: builds a worker's inner loop from (model, trainable (name, parameter) pairs, live buffers)
InnerFactory = Callable[[torch.nn.Module, Sequence[tuple[str, torch.nn.Parameter]], list[torch.Tensor]],
                        "InnerLoop | ExternalInner"]


@dataclass
class Pending:
    """What this worker offered for a round, kept until the round's outcome is known."""

    round: int
    deltas: list[torch.Tensor]  # Δ per tensor, fp32
    wanted: list[torch.Tensor]  # u per tensor (what feedback wanted to send)
    encoded: dict[str, dict[str, torch.Tensor]]
    frame: bytes
    buffers: list[torch.Tensor] = field(default_factory=list)  # the buffer values sent
    reset: str = ""  # why the local state was reset from θ_ref before this frame ("" when it was not)


@dataclass
class ApplyReport:
    committed: bool
    contributed: bool
    members: tuple[str, ...]
    rejected: dict[str, str]  # sender → reason


#: what a worker may do to its pseudo-gradient before error feedback and the codec (``prepare``): per tensor, model
#: order, fp32 → same shapes. Honest workers pass none; the Byzantine benchmark's attackers do (node/bench/attacks.py)
Transform = Callable[[list[torch.Tensor]], list[torch.Tensor]]


class Worker:
    """One worker: a model, its inner loop, error feedback and its replica of the reference.

    Raises ConfigError at construction for a model lowband cannot train (a parameter or buffer dtype, named) or a
    codec that needs error feedback this recipe lacks (``Reference``)."""

    def __init__(self, name: str, cfg: RunConfig, task: Task, shard: int, num_shards: int,
                 device: torch.device | str = "cpu", reference_device: torch.device | str = "cpu",
                 key: NodeKey | None = None, *, model: torch.nn.Module | None = None,
                 inner: InnerFactory | None = None, local: LocalGroup | None = None) -> None:
        """``key``: signs every frame (None: unsigned frames, which only runs that verify nothing accept).
        ``model``: train this model instead of building the task's (the Python API: the user's model, which must
        already hold the run's initial values; it stays on its device). ``inner``: what takes the inner steps, given
        (model, trainable (name, parameter) pairs, live buffers) — by default the task-driven ``InnerLoop``.
        ``local``: the node's local process group (a multi-process node: DDP, this rank's part of the shard)."""
        self.name, self.cfg, self.task, self.key = name, cfg, task, key
        self.shard, self.num_shards = shard, num_shards
        recipe = cfg.recipe
        if model is None:
            self.device = torch.device(device)
            self.model = build_seeded(task, cfg.seed).to(self.device)  # same seed: identical start everywhere
        else:
            self.model = model
            self.device = next((p.device for p in model.parameters()), torch.device(device))
        named = model_tensors.trainable(self.model)
        self.params = [p for _, p in named]
        named_buffers = model_tensors.buffers(self.model)
        self.buffers = [b for _, b in named_buffers]  # the model's live buffers
        self.reference = Reference(cfg, named, reference_device, named_buffers)
        self.names, self.spec, self.codec = self.reference.names, self.reference.spec, self.reference.codec
        self.feedback = make_feedback(recipe.feedback_decay)
        if inner is not None:
            self.inner: InnerLoop | ExternalInner = inner(self.model, named, self.buffers)
        else:
            data_shard, data_shards = (shard, num_shards) if local is None else local.data_shard(shard, num_shards)
            loop = InnerLoop(recipe.inner, task, self.model, named,
                             lambda start: task.batches_from(data_shard, data_shards, cfg.seed, start),
                             cfg.total_inner_steps, self.device, self.buffers)
            if local is not None:
                loop.wrap, loop.agree, loop.replicas = local.wrap, local.agree, local.world
            self.inner = loop
        self.masters = self.inner.masters  # fp32: the parameters themselves for an fp32 model
        self.pending: Pending | None = None
        self.resets = 0  # times the local state was reset from θ_ref (poisoned)
        self._saturation_noted: set[str] = set()

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
            return [m.grad.detach().float().to(r.device) if m.grad is not None else torch.zeros_like(r)
                    for m, r in zip(self.masters, self.ref)]
        return [r - m.detach().float().to(r.device) for r, m in zip(self.ref, self.masters)]

    def _poisoned(self, xs: list[torch.Tensor]) -> str | None:
        """Why this worker's local state cannot be sent (NaN/inf in the scaled Δ, the inner state or the buffers), or
        None."""
        bad = model_tensors.first_nonfinite(zip(self.names, xs))
        if bad is not None:
            return f"pseudo-gradient {bad}"
        bad = self.inner.state_is_finite()
        if bad is not None:
            return f"inner state {bad}"
        bad = model_tensors.first_nonfinite(zip(self.reference.buffer_names, self.buffers))
        return None if bad is None else f"buffer {bad}"

    def reset_local(self, why: str) -> None:
        """Poisoned: the local model, masters and buffers back to θ_ref, fresh inner optimizer moments. The error
        feedback residual is kept (it is checked per tensor in ``prepare``)."""
        self.resets += 1
        log.error("[node=%s] local state poisoned (%s): reset from θ_ref, fresh inner moments; this round sends Δ = 0",
                  self.name, why)
        self.inner.reset_optimizer()
        self.load_reference_into_model()

    def prepare(self, round_: int, inner_lr: float | None = None, transform: Transform | None = None) -> bytes:
        """Encode this round's update (η_t defaults to the round's scheduled lr); returns the frame, signed with the
        worker's key, which is always valid: a poisoned local state is reset first (Δ = 0 this round), a non-finite
        residual dropped, every value brought into the codec's range. ``transform``: applied to the scaled
        pseudo-gradient x (per tensor) before error feedback; its output must be finite (the Byzantine benchmark)."""
        scale = self.payload_scale(round_, inner_lr)
        deltas = self._pseudo_gradients()
        xs = [delta * scale if scale != 1.0 else delta for delta in deltas]
        if transform is not None:
            xs = [x.to(torch.float32) for x in transform(xs)]
        reset = self._poisoned(xs) or ""  # x, not Δ: a finite Δ divided by a small η_t can still overflow
        if reset:
            self.reset_local(reset)
            deltas = [torch.zeros_like(r) for r in self.ref]
            xs = [torch.zeros_like(r) for r in self.ref]
            if self.inner.optimizer is None:
                for m in self.masters:
                    m.grad = None
        wanted = [self.feedback.compensate(name, x) for name, x in zip(self.names, xs)]
        while (bad := model_tensors.first_nonfinite(zip(self.names, wanted))) is not None:
            # x is finite here, so a residual overflowed or was poisoned: drop it rather than send (or keep) a
            # non-finite value; each pass drops one, and u = x then, so this ends
            i = next(i for i, u in enumerate(wanted) if model_tensors.first_nonfinite([("", u)]) is not None)
            log.error("[node=%s round=%d] error-feedback residual: %s; dropped", self.name, round_, bad)
            self.feedback.residuals.pop(self.names[i], None)
            wanted[i] = self.feedback.compensate(self.names[i], xs[i])
        encoded = {}
        for name, u in zip(self.names, wanted):
            encoded[name] = self.codec.encode(self.codec.fit(u))
            self._note_saturation(name, encoded[name])
        sent = [b.detach().to(self.reference.device).clone() for b in self.buffers]
        frame = wire.pack(self.cfg.run_id, round_, self.name, self.codec, self.spec, encoded,
                          self.reference.buffer_spec, dict(zip(self.reference.buffer_names, sent)), key=self.key)
        self.pending = Pending(round_, deltas, wanted, encoded, frame, sent, reset)
        return frame

    def payload_scale(self, round_: int, inner_lr: float | None = None) -> float:
        """What multiplies Δ before error feedback in round ``round_`` (``recipe.payload_scale``: 1, 1/η_t or η_t; η_t
        the round's scheduled lr unless ``inner_lr`` is given, or the user's optimizer's lr for the Python API's inner
        loop, ``InnerLoop.payload_lr``)."""
        if inner_lr is None:
            inner_lr = self.inner.payload_lr()
        eta = self.reference.inner_lr(round_) if inner_lr is None else inner_lr
        return {"unit": 1.0, "inverse_inner_lr": 1.0 / eta, "inner_lr": eta}[self.cfg.recipe.payload_scale]

    def _note_saturation(self, name: str, enc: dict[str, torch.Tensor]) -> None:
        """Say once per tensor when an f16 wire value hit ±65504 (the rest stays in error feedback)."""
        if name in self._saturation_noted:
            return
        for key, buf in enc.items():
            if buf.dtype == torch.float16 and buf.numel() and float(buf.abs().max()) >= 65504.0:
                self._saturation_noted.add(name)
                log.warning("[node=%s] %r: %s values reached fp16's ±65504 and were saturated; error feedback keeps "
                            "the excess (bf16 values carry fp32's range)", self.name, name, key)
                return

    def _result_aggregate(self, result: RoundResult) -> tuple[Aggregate | None, tuple[str, ...], dict[str, str]]:
        """(aggregate, members, rejected senders) of a committed result; aggregate None when nothing valid."""
        if result.aggregate is not None:
            try:
                aggregate = self.reference.unpack_aggregate(result.aggregate, result.round, result.aggregate_codec)
            except PayloadError as exc:
                log.error("[node=%s round=%d] rejected the aggregate: %s", self.name, result.round, exc)
                return None, (), {"coordinator": str(exc)}
            return aggregate, tuple(result.aggregate_members), {}
        envelopes, rejected = self.reference.unpack(result.payloads, result.round, KeyRing.of(result.member_keys))
        if not envelopes:
            return None, (), rejected
        return self.reference.reduce(envelopes), tuple(e.sender for e in envelopes), rejected

    def apply(self, result: RoundResult) -> ApplyReport:
        pending = self.pending
        assert pending is not None and pending.round == result.round, "apply() must follow prepare() for that round"
        if not result.committed:
            # kept: the round is offered again with this same frame (peers that already hold it, or a coordinator
            # that accepted it, must see the same bytes), so the round's outcome is the same whichever copy counts
            return ApplyReport(False, False, (), {})
        self.pending = None
        aggregate, members, rejected = self._result_aggregate(result)
        if result.aggregate is None:
            for sender, reason in rejected.items():
                log.warning("[node=%s round=%d] rejected payload from %s: %s", self.name, result.round, sender, reason)
        if aggregate is None:
            return ApplyReport(False, False, (), rejected)
        report = aggregate.report
        contributed = self.name in members and (report is None or self.name in report.factors)
        factors = report.factors.get(self.name) if report is not None else None
        before = self._snapshot() if self.cfg.recipe.overlap else None
        for t, (name, u, enc) in enumerate(zip(self.names, pending.wanted, pending.encoded.values())):
            if contributed:
                shape = tuple(u.shape)
                f = 1.0 if factors is None else factors[t]
                self.feedback.commit(name, u, self.codec.decode(enc if f == 1.0 else self.codec.scaled(enc, shape, f),
                                                                shape))
            else:
                self.feedback.keep(name, u)
        residuals = [self.feedback.residuals.get(n, torch.zeros_like(r)) for n, r in zip(self.names, self.ref)]
        self.reference.step(aggregate, result.round, (pending.deltas, residuals))
        if before is None:
            self.load_reference_into_model()
        else:
            self._shift_local(before, pending.deltas, pending.buffers)
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
        aggregate, _, _ = self._result_aggregate(result)
        if aggregate is None:
            return False
        if getattr(self.outer, "set_round_context", None) is not None:
            return False  # the faithful decoupled rule mixes in this worker's own Δ: there is none for this round
        if self.pending is not None and self.pending.round <= result.round:
            self.pending = None  # a frame for this round (sat out) or an older one is not offered again
        before = self._snapshot() if keep_local_progress else None
        self.reference.step(aggregate, result.round)
        if before is None:
            self.load_reference_into_model()
        else:
            self._shift_local(before, None, None)
        return True

    def _snapshot(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [r.detach().clone() for r in self.ref], [b.detach().clone() for b in self.reference.buffers]

    def _shift_local(self, before: tuple[list[torch.Tensor], list[torch.Tensor]], deltas: list[torch.Tensor] | None,
                     sent: list[torch.Tensor] | None) -> None:
        """Overlap: θ ← θ + (θ_ref_new − θ_ref_old) + Δ_r, keeping the progress made since round r ended
        (``deltas`` None: Δ_r = 0, a round this worker only observed). Buffers likewise: b ← b + (agreed − sent) —
        or + (agreed − previous agreed) for an observed round; bool buffers take the agreed value."""
        old_ref, old_buffers = before
        with torch.no_grad():
            for i, (m, new, old) in enumerate(zip(self.masters, self.ref, old_ref)):
                step = new - old if deltas is None else new - old + deltas[i]
                m.add_(step.to(m.device, m.dtype))
            self.inner.sync_model()
            for b, new, base in zip(self.buffers, self.reference.buffers, sent if sent is not None else old_buffers):
                if b.dtype == torch.bool:
                    b.copy_(new)
                elif b.is_floating_point():
                    b.copy_(b.double() + (new.double() - base.double()).to(b.device))
                else:
                    b.add_((new - base).to(b.device, b.dtype))

    @contextlib.contextmanager
    def reference_weights(self) -> Iterator[torch.nn.Module]:
        """The model holding θ_ref and the reference buffers for a while (evaluation), then its own back."""
        saved = [p.detach().clone() for p in self.params], [b.detach().clone() for b in self.buffers]
        model_tensors.assign(self.params, self.ref)
        model_tensors.assign(self.buffers, self.reference.buffers)
        try:
            yield self.model
        finally:
            model_tensors.assign(self.params, saved[0])
            model_tensors.assign(self.buffers, saved[1])

    def load_reference_into_model(self) -> None:
        """Local state ← the reference: the masters (and a mixed model's parameters) to θ_ref, buffers to theirs."""
        model_tensors.assign(self.masters, self.ref)
        self.inner.sync_model()
        model_tensors.assign(self.buffers, self.reference.buffers)

    # -- inspection and persistence ----------------------------------------------------------------
    def fingerprint(self) -> str:
        """Digest of the reference parameters and buffers: equal digests mean bit-identical replicas."""
        return self.reference.fingerprint()

    def payload_bytes(self) -> int:
        """Exact frame size of this worker's payload (the byte formula + envelope)."""
        return wire.expected_size(self.codec, self.spec, self.cfg.run_id, self.name,
                                  extra_spec=self.reference.buffer_spec, signed=self.key is not None)

    def adopt_global_state(self, blob: bytes) -> None:
        """Take the run's reference state (a joiner, or a replica whose fingerprint diverged). Raises ValueError
        (``StateFormatError``) for a blob that is not a state of this run and model; nothing changes then."""
        self.reference.load_bytes(blob)
        self.inner.follow_run(self.reference.committed_rounds * self.cfg.recipe.H)  # the schedule follows the run
        self.load_reference_into_model()
