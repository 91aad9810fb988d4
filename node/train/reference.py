"""The reference state θ_ref and how a committed round changes it; shared by workers and the coordinator.

Both sides run exactly this code on the same frames in the same (sorted-by-sender) order, so for the
replica-consistent recipes every worker and the coordinator hold bit-identical parameters, which the
published fingerprint checks. θ_ref and the outer optimizer live in fp32 on ``device`` (CPU by default:
the same arithmetic everywhere, whatever accelerator the inner loop uses).

The model's buffers (BatchNorm statistics and the like) are part of the reference too: each frame carries its
sender's buffer values, and a committed round sets the reference buffers to their mean over the round's members
(floating buffers, accumulated in fp64 in sender order) or their elementwise max (integer and bool buffers).
They join the fingerprint and the state; docs/algorithms.md, §10.

With a recipe's ``reduce`` not at its default (docs/algorithms.md §11), ``reduce`` bounds each sender's payload and
combines them robustly (node/robust/), returning an accountability report with the aggregate; the history those
bounds keep and each member's record (eviction) are part of the reference (``robust``), committed by ``step`` and
carried in the state. With ``reduce`` at its default none of that runs: the codec's reduce, exactly as before.

Frames are verified against their senders' keys when ``unpack`` is given a ``KeyRing`` (node/keyring.py).

The state (``to_bytes``, ``load_bytes``) is a safetensors file with a JSON header (node/train/state_file.py;
docs/state.md): ``param/<name>`` (θ_ref, fp32), ``buffer/<name>`` (own dtype), ``outer/<name>/<key>`` and
``outer.extra/<key>`` (the outer optimizer's state, e.g. the randomized sign's generator), ``robust/history`` (F64,
with ``reduce`` on), ``downlink/<name>`` (F32, the coordinator's downlink error-feedback residual with ``[rounds]
result = "compressed"``, node/train/downlink.py; a reference without a downlink, such as a member's, checks and
ignores it).
"""
from __future__ import annotations

import hashlib
import logging
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from node import wire
from node.compress import make_codec
from node.config import RunConfig, diff_configs
from node.errors import ConfigError, PayloadError
from node.keyring import KeyRing
from node.outer import is_replica_consistent, make_outer
from node.robust.pipeline import reduce_round
from node.robust.report import RoundReport
from node.robust.state import HEADER_BYTES as ROBUST_HEADER_BYTES
from node.robust.state import HISTORY_KEY, RobustState, RobustStateError
from node.train import state_file, tensors as model_tensors
from node.train.buffer_reduce import reduce_buffer
from node.train.downlink import aggregate_codec, compress_with_feedback
from node.train.schedule import round_inner_lr
from node.train.state_file import StateFile, StateFormatError

log = logging.getLogger(__name__)
AGGREGATE_SENDER = "coordinator"
DOWNLINK_PREFIX = "downlink/"  # state entries of the downlink residual, one per trainable tensor
F16_LIMIT = 65504.0


def tensors_fingerprint(tensors: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        # hashed through a view of the tensor's memory: no copy of a (possibly GB-sized) tensor
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


model_digest = model_tensors.model_digest  # re-exported: callers that hash a spec import it from here


class Aggregate(list):
    """A round's outcome to apply: the fp32 aggregate per trainable tensor (this list, in model order) and
    ``buffers``, the agreed value of each buffer (model order, own dtype; empty for a model without buffers).
    With ``reduce`` on, ``report`` (what the bounds did to each member's frame) and ``robust`` (the robust state after
    the round, which ``Reference.step`` commits); both None otherwise."""

    def __init__(self, tensors: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor] = (),
                 report: RoundReport | None = None, robust: RobustState | None = None) -> None:
        super().__init__(tensors)
        self.buffers = list(buffers)
        self.report, self.robust = report, robust


class Reference:
    """θ_ref (fp32, one tensor per trainable parameter), the buffers and the outer optimizer.

    ``named``: the trainable parameters (``tensors.trainable(model)``); ``buffers``: the persistent buffers
    (``tensors.buffers(model)``); ``for_model`` takes both from a model. Raises ConfigError at start-up for a
    parameter dtype lowband cannot train, or a codec that saturates at fp16's ±65504 without error feedback to carry
    the excess (docs/algorithms.md, §5).

    ``downlink_feedback``: this reference sends a compressed downlink (the coordinator with ``[rounds] result =
    "compressed"``) and keeps its error-feedback residual ``downlink`` (fp32, one tensor per trainable tensor, zeros at
    the start; part of the state). None otherwise."""

    def __init__(self, cfg: RunConfig, named: Sequence[tuple[str, torch.Tensor]], device: str | torch.device = "cpu",
                 buffers: Sequence[tuple[str, torch.Tensor]] = (), *, downlink_feedback: bool = False) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.names = [n for n, _ in named]
        self.spec = wire.model_spec(named)
        for name, t in named:
            if t.dtype not in model_tensors.TRAINABLE_DTYPES:
                raise ConfigError(f"parameter {name!r} is {t.dtype}: lowband trains float32, bfloat16 and float16")
        self.tensors = [t.detach().to(self.device, torch.float32).clone() for _, t in named]  # θ_ref, fp32
        self.buffer_names = [n for n, _ in buffers]
        self.buffer_spec = model_tensors.buffer_spec(buffers)
        self.buffers = [b.detach().to(self.device).clone() for _, b in buffers]  # own dtype
        recipe = cfg.recipe
        self.codec = make_codec(recipe.codec.name, recipe.codec.params)
        if self.codec.wire_limit() <= F16_LIMIT and recipe.feedback_decay is None and self.names:
            raise ConfigError(
                f"codec {self.codec.describe()} saturates at ±65504 (fp16) and this recipe has no error feedback to "
                f"carry what is cut off: tensor {self.names[0]!r} (and every other) could lose updates beyond that. "
                "Set feedback_decay (e.g. 1.0), or use bf16 values, which carry fp32's range")
        self.outer = make_outer(recipe.outer.name, list(zip(self.names, self.tensors)), recipe.outer.lr,
                                dict(recipe.outer.params))
        self.committed_rounds = 0  # rounds applied so far; the next round to apply has this number
        #: bounds' history and members' records (node/robust/state.py); None with ``reduce`` at its default
        self.robust = RobustState.fresh(len(self.names)) if recipe.reduce.enabled else None
        self.last_report: RoundReport | None = None  # the report of the last round ``step`` applied from frames
        #: e of the compressed downlink (node/train/downlink.py), fp32 per trainable tensor; None: no downlink to send
        self.downlink = [torch.zeros_like(t) for t in self.tensors] if downlink_feedback else None

    @classmethod
    def for_model(cls, cfg: RunConfig, model: nn.Module, device: str | torch.device = "cpu", *,
                  downlink_feedback: bool = False) -> "Reference":
        """The reference of ``model``: its trainable parameters and persistent buffers."""
        return cls(cfg, model_tensors.trainable(model), device, model_tensors.buffers(model),
                   downlink_feedback=downlink_feedback)

    def digest(self) -> str:
        """The model digest a node presents at Join (trainable tensors, then buffers)."""
        return model_tensors.model_digest(self.spec, self.buffer_spec)

    def dense_bytes(self) -> int:
        """One member's Δ as dense fp32: the baseline a codec's bytes compare to (metrics)."""
        return 4 * sum(math.prod(t.shape) for t in self.spec)

    @property
    def replica_consistent(self) -> bool:
        return is_replica_consistent(self.outer)

    def inner_lr(self, round_: int) -> float:
        r, total = self.cfg.recipe, self.cfg.total_inner_steps
        return round_inner_lr(r.inner.lr, r.inner.warmup_steps, total, r.inner.min_lr_ratio, r.H, round_)

    def unpack(self, frames: dict[str, bytes], round_: int, keys: KeyRing | None = None
               ) -> tuple[list[wire.Envelope], dict[str, str]]:
        """Validate every member's frame (sorted by sender); invalid ones are dropped with a reason. ``keys``: verify
        each frame's signature against the key registered for its sender first (``wire.unpack``); None: no
        signature is checked.

        Validation is deterministic, so every replica given the same keys drops the same frames and stays identical.
        """
        good, rejected = [], {}
        for sender, frame in sorted(frames.items()):
            try:
                good.append(wire.unpack(frame, self.codec, self.spec, self.cfg.run_id, round_,
                                        extra_spec=self.buffer_spec, sender=sender, keys=keys))
            except PayloadError as exc:
                rejected[sender] = str(exc)
        return good, rejected

    def reduce(self, envelopes: Sequence[wire.Envelope]) -> Aggregate:
        """The codec's reduce of the envelopes (sorted by sender), per tensor, fp32; and the buffers' agreed values.
        With ``reduce`` on: bounded and robust (node/robust/pipeline.py), with the round's report and the next robust
        state; the buffers are those of the frames that entered the aggregate (none: the reference's own)."""
        assert envelopes, "reduce() needs at least one payload"
        assert [e.sender for e in envelopes] == sorted(e.sender for e in envelopes), "reduce order must be sorted"
        if self.robust is not None:
            outcome = reduce_round(self.codec, self.names, [tuple(t.shape) for t in self.tensors], envelopes,
                                   self.robust, self.cfg.recipe.reduce, envelopes[0].round, self.device)
            buffers = self.reduce_buffers(outcome.kept) if outcome.kept else [b.clone() for b in self.buffers]
            return Aggregate(outcome.tensors, buffers, outcome.report, outcome.state)
        return Aggregate([self.reduce_one(envelopes, i) for i in range(len(self.tensors))],
                         self.reduce_buffers(envelopes))

    def reduce_one(self, envelopes: Sequence[wire.Envelope], i: int) -> torch.Tensor:
        """The codec's reduce of trainable tensor ``i`` over the envelopes (sorted by sender): fp32, its shape."""
        name = self.names[i]
        encs = [{k: v.to(self.device) for k, v in e.tensors[name].items()} for e in envelopes]
        return self.codec.reduce(encs, tuple(self.tensors[i].shape))

    def reduce_buffers(self, envelopes: Sequence[wire.Envelope]) -> list[torch.Tensor]:
        """Each buffer's agreed value: floating ones the mean over the envelopes (fp64 sum in the envelopes' order, one
        division, cast back: bit-identical on every replica and never overflowing), integer and bool ones the
        elementwise max (for a counter such as ``num_batches_tracked``, the furthest member's count)."""
        return [reduce_buffer([e.extra[spec.name].to(self.device) for e in envelopes], spec)
                for spec in self.buffer_spec]  # node/train/buffer_reduce.py

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
        self._set_outer_lr(round_)
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
        self._stepped(aggregate, round_)

    @property
    def steps_tensor_by_tensor(self) -> bool:
        """Whether ``step_each`` may take this reference's outer step: an outer optimizer that steps each parameter
        alone, no global clip norm, no robust reduce (its bounds look at every tensor), no per-worker context."""
        return (bool(getattr(self.outer, "steps_each_parameter_alone", False)) and self.robust is None
                and self.cfg.recipe.outer.clip_norm is None and getattr(self.outer, "set_round_context", None) is None)

    def step_each(self, aggregate_of: Callable[[int], torch.Tensor], buffers: Sequence[torch.Tensor],
                  round_: int) -> None:
        """``step`` one parameter at a time: ``aggregate_of(i)`` gives trainable tensor i's aggregate (fp32, its
        shape) just before it is stepped, so at most one aggregate tensor exists at a time — not a whole model's.
        ``buffers``: the round's agreed buffers. Bit-identical to ``step`` where ``steps_tensor_by_tensor``
        (asserted)."""
        assert self.steps_tensor_by_tensor, "this outer step needs every parameter's aggregate at once"
        self._set_outer_lr(round_)
        for i, ref in enumerate(self.tensors):
            ref.grad = aggregate_of(i).to(self.device, torch.float32)
            self.outer.step()  # only this parameter has a .grad: only it is stepped
            ref.grad = None
        self._stepped(Aggregate([], buffers), round_)

    def _set_outer_lr(self, round_: int) -> None:
        recipe = self.cfg.recipe
        lr = recipe.outer.lr * (self.inner_lr(round_) if recipe.outer.lr_follows_inner else 1.0)
        for group in self.outer.param_groups:
            group["lr"] = lr

    def _stepped(self, aggregate: Sequence[torch.Tensor], round_: int) -> None:
        """After the outer step of round ``round_``: the finiteness check, the agreed buffers, the robust state and
        report the aggregate carries, the committed-round count."""
        bad = model_tensors.first_nonfinite(zip(self.names, self.tensors))
        if bad is not None:
            # validated frames are finite and bounded, so this needs ~10^7 rounds of saturated aggregates: the run's
            # state is then unusable and every replica fails here alike rather than carrying on with it
            raise FloatingPointError(f"round {round_}: the outer step left θ_ref non-finite ({bad})")
        buffers = getattr(aggregate, "buffers", None)
        if buffers:
            model_tensors.assign(self.buffers, buffers)
        robust = getattr(aggregate, "robust", None)
        if robust is not None and self.robust is not None:
            self.robust = robust
        self.last_report = getattr(aggregate, "report", None)
        self.committed_rounds = round_ + 1

    # -- aggregate results (coordinator-side reduce) ------------------------------------------------
    def pack_aggregate(self, aggregate: Sequence[torch.Tensor], round_: int, codec_name: str) -> tuple[bytes, Aggregate]:
        """Encode an aggregate for the wire with a dense codec; returns the frame and what it decodes to.

        Whoever applies an aggregate applies the *decoded* one, so the sender and every receiver take the
        same step even when the wire precision (bf16) is lower than fp32. Values beyond the codec's range are
        saturated (``Codec.fit``; logged), identically for everyone. The buffers travel exact.
        """
        codec = make_codec(codec_name)
        fitted = [codec.fit(a) for a in aggregate]
        for name, a, f in zip(self.names, aggregate, fitted):
            if f is not a and not torch.equal(f, a):
                log.warning("[round=%d] aggregate of %r saturated at ±%g (%s)", round_, name, codec.wire_limit(),
                            codec_name)
        encoded = {name: codec.encode(f) for name, f in zip(self.names, fitted)}
        buffers = list(getattr(aggregate, "buffers", ())) or [b.clone() for b in self.buffers]
        frame = wire.pack(self.cfg.run_id, round_, AGGREGATE_SENDER, codec, self.spec, encoded, self.buffer_spec,
                          dict(zip(self.buffer_names, buffers)))
        decoded = [codec.decode(encoded[n], tuple(a.shape)) for n, a in zip(self.names, aggregate)]
        return frame, Aggregate(decoded, buffers, getattr(aggregate, "report", None), getattr(aggregate, "robust", None))

    def pack_compressed(self, aggregate: Sequence[torch.Tensor], round_: int,
                        residual: list[torch.Tensor] | None = None) -> tuple[bytes, Aggregate]:
        """Encode an aggregate for the wire with the run's own codec and the downlink's error feedback (DoubleSqueeze,
        arXiv 1905.05957; node/train/downlink.py): Q = C(A + e), e ← (A + e) − D(Q). Returns the frame of Q (sender
        ``coordinator``, unsigned like every aggregate frame) and what it decodes to, D(Q), which the sender and every
        member apply. Advances ``residual`` in place (the coordinator passes a copy of ``self.downlink`` and swaps it in
        at the step: coordinator/commit.py), or ``self.downlink`` when None (the simulator). The buffers travel exact.
        Raises RuntimeError when this reference keeps no downlink residual."""
        if self.downlink is None:
            raise RuntimeError("this reference keeps no downlink residual (Reference(downlink_feedback=True))")
        encoded, decoded = compress_with_feedback(self.codec, self.names, aggregate,
                                                  self.downlink if residual is None else residual)
        buffers = list(getattr(aggregate, "buffers", ())) or [b.clone() for b in self.buffers]
        frame = wire.pack(self.cfg.run_id, round_, AGGREGATE_SENDER, self.codec, self.spec, encoded, self.buffer_spec,
                          dict(zip(self.buffer_names, buffers)))
        return frame, Aggregate(decoded, buffers, getattr(aggregate, "report", None), getattr(aggregate, "robust", None))

    def apply_aggregate(self, envelopes: Sequence[wire.Envelope], round_: int, dense_codec: str | None) -> bytes:
        """A round applied as an aggregate result: reduce the envelopes (sorted by sender), encode the aggregate with
        ``dense_codec`` (``result = "aggregate"``) or, None, with the run's codec and the downlink's error feedback
        (``result = "compressed"``), then take the outer step with what that frame decodes to, exactly as every member
        applying the frame will. Returns the frame."""
        reduced = self.reduce(envelopes)
        frame, decoded = (self.pack_compressed(reduced, round_) if dense_codec is None
                          else self.pack_aggregate(reduced, round_, dense_codec))
        self.step(decoded, round_)
        return frame

    def unpack_aggregate(self, frame: bytes, round_: int, codec_name: str) -> Aggregate:
        """Validate an aggregate frame (``codec_name``: what the coordinator named its codec, the run's own for a
        compressed downlink or a dense one, node/train/downlink.py) against this run's model and, for the run's codec,
        its parameters and bounds (node/wire.py); raises PayloadError."""
        codec = aggregate_codec(codec_name, self.codec)
        env = wire.unpack(frame, codec, self.spec, self.cfg.run_id, round_, extra_spec=self.buffer_spec)
        if env.sender != AGGREGATE_SENDER:
            raise PayloadError(f"aggregate frame names sender {env.sender!r}, expected {AGGREGATE_SENDER!r}")
        return Aggregate([codec.decode(env.tensors[n], tuple(t.shape)) for n, t in zip(self.names, self.tensors)],
                         [env.extra[n] for n in self.buffer_names])

    def fingerprint(self) -> str:
        """Digest of θ_ref then the buffers (16 hex): equal digests mean bit-identical replicas. A model without
        buffers has the digest of θ_ref alone, as before buffers joined it."""
        return tensors_fingerprint(self.tensors + self.buffers)

    # -- state for joiners and checkpoints -----------------------------------------------------------
    def names_by_id(self) -> dict[int, str]:
        return {id(t): n for n, t in zip(self.names, self.tensors)}

    def state(self, copy: bool = True, fingerprint: str | None = None
              ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON header, tensors) of the state: copies, so the caller may keep them while training goes on.
        ``copy=False``: the live tensors themselves (no memory), for a writer that finishes before the next step
        changes them or copies each one first (coordinator/snapshot.py). ``fingerprint``: this state's, when the caller
        knows it already (hashing a large state takes seconds)."""
        def own(t: torch.Tensor) -> torch.Tensor:
            return t.detach().clone() if copy else t.detach()

        outer_header, outer_tensors = state_file.optimizer_state(self.outer, self.names_by_id(), "outer", copy)
        header = {"kind": "reference", "run": self.cfg.to_dict(), "committed_rounds": self.committed_rounds,
                  "fingerprint": fingerprint or self.fingerprint(), "params": list(self.names),
                  "buffers": list(self.buffer_names), "outer": {"name": self.cfg.recipe.outer.name, **outer_header}}
        tensors = {f"param/{n}": own(t) for n, t in zip(self.names, self.tensors)}
        tensors |= {f"buffer/{n}": own(b) for n, b in zip(self.buffer_names, self.buffers)}
        if self.robust is not None:
            header["robust"] = self.robust.header()
            tensors |= self.robust.tensors()
        if self.downlink is not None:
            header["downlink"] = {"feedback": "residual"}
            tensors |= {f"{DOWNLINK_PREFIX}{n}": e.detach().clone() for n, e in zip(self.names, self.downlink)}
        return header, tensors | outer_tensors

    def to_bytes(self) -> bytes:
        """The state as a safetensors file with lowband's JSON header (docs/state.md)."""
        header, tensors = self.state()
        return state_file.dumps(tensors, header)

    def load_bytes(self, blob: bytes) -> None:
        """Take a state from outside (the network): refused with a ValueError naming what is wrong unless it is a
        lowband state of this run and model; nothing is allocated before the structure is checked, and nothing
        changes unless all of it loads."""
        self.load_state(state_file.parse(blob, self.max_header()), kind="reference")

    def max_header(self) -> int:
        """Bound on a state file's JSON header for this model (names and entries, generously), and the robust
        records the writer keeps at most (node/robust/state.py)."""
        names = sum(len(n.encode()) for n in self.names + self.buffer_names)
        robust = ROBUST_HEADER_BYTES if self.robust is not None else 0
        downlink = 64 * names + 256 * len(self.names)  # a coordinator's state may carry the downlink residual
        return (1 << 20) + 64 * names + 2048 * (len(self.names) + len(self.buffer_names)) + robust + downlink

    def load_state(self, sf: StateFile, kind: str = "reference", others: tuple[str, ...] = ()) -> None:
        """Load the reference section of a parsed state file (``kind`` ``reference``, or ``checkpoint``, whose
        tensors under the prefixes ``others`` belong to the worker). Raises StateFormatError; on any error the
        reference is as it was."""
        h = sf.header
        if h.get("kind") != kind:
            raise StateFormatError(f"state is a {h.get('kind')!r}, expected a {kind!r}")
        run = h.get("run")
        if not isinstance(run, dict) or run.get("run_id") != self.cfg.run_id:
            raise StateFormatError(f"state is for run {run.get('run_id') if isinstance(run, dict) else None!r}, "
                                   f"this run is {self.cfg.run_id!r}")
        recipe = run.get("recipe")
        if not isinstance(recipe, dict):
            raise StateFormatError("state has no recipe in its run configuration")
        diffs = diff_configs(recipe, self.cfg.to_dict()["recipe"])
        if diffs:
            raise StateFormatError("state is from another recipe: " + "; ".join(diffs[:3]))
        if h.get("params") != self.names or h.get("buffers") != self.buffer_names:
            raise StateFormatError("state holds different tensors than this model (params or buffers differ)")
        committed, fingerprint = h.get("committed_rounds"), h.get("fingerprint")
        if type(committed) is not int or not 0 <= committed < 1 << 53:
            raise StateFormatError(f"committed_rounds {committed!r} is not a non-negative integer")
        if not isinstance(fingerprint, str) or len(fingerprint) != 16:
            raise StateFormatError(f"fingerprint {fingerprint!r} is not 16 hex characters")
        expected = {f"param/{n}": (torch.float32, tuple(t.shape)) for n, t in zip(self.names, self.tensors)}
        expected |= {f"buffer/{s.name}": (s.dtype, s.shape) for s in self.buffer_spec}
        if self.robust is not None:
            expected[HISTORY_KEY] = (torch.float64, (len(self.names),))
        elif "robust" in h:
            raise StateFormatError("state holds a 'robust' section but this recipe's reduce is the default")
        downlink = h.get("downlink")
        if downlink is not None and downlink != {"feedback": "residual"}:
            raise StateFormatError(f"state's 'downlink' section {downlink!r} is not {{'feedback': 'residual'}}")
        residual_keys = [f"{DOWNLINK_PREFIX}{n}" for n in self.names] if downlink is not None else []
        for key, t in zip(residual_keys, self.tensors):
            expected[key] = (torch.float32, tuple(t.shape))
        stray = [k for k in sf.entries if k not in expected and not k.startswith(("outer/", "outer.extra/") + others)]
        if stray:
            raise StateFormatError(f"state holds tensors this model does not have: {sorted(stray)[:3]}")
        for key, (dtype, shape) in expected.items():
            sf.expect(key, dtype, shape)
        # a reference without a downlink (a member, an export) checked the residual's entries and leaves them unread
        wanted = [k for k in expected if self.downlink is not None or not k.startswith(DOWNLINK_PREFIX)]
        values = {k: state_file.check_finite(sf, k, sf.tensor(k)) for k in wanted}
        robust = None
        if self.robust is not None:
            try:
                robust = RobustState.from_state(h.get("robust"), values[HISTORY_KEY], len(self.names), committed)
            except RobustStateError as exc:
                raise StateFormatError(str(exc)) from None
        if self.downlink is not None and not residual_keys:
            # a state from relay or aggregate mode, now sending a compressed downlink: nothing was held back yet
            log.warning("the state holds no downlink residual (written with another [rounds] result): it starts at 0")
        saved = ([t.clone() for t in self.tensors], [b.clone() for b in self.buffers], self.outer.state_dict(),
                 self.committed_rounds, [e.clone() for e in self.downlink] if self.downlink is not None else None)
        try:
            model_tensors.assign(self.tensors, [values[f"param/{n}"] for n in self.names])
            model_tensors.assign(self.buffers, [values[f"buffer/{n}"] for n in self.buffer_names])
            if self.downlink is not None:
                model_tensors.assign(self.downlink, [values[k] for k in residual_keys] if residual_keys
                                     else [torch.zeros_like(e) for e in self.downlink])
            state_file.load_optimizer_state(self.outer, self.names_by_id(), "outer", sf)
            self.committed_rounds = committed
            if self.fingerprint() != fingerprint:
                raise StateFormatError("state fingerprint mismatch after loading (corrupted state)")
            if robust is not None:
                self.robust = robust
        except BaseException:
            model_tensors.assign(self.tensors, saved[0])
            model_tensors.assign(self.buffers, saved[1])
            self.outer.load_state_dict(saved[2])
            self.committed_rounds = saved[3]
            if saved[4] is not None:
                model_tensors.assign(self.downlink, saved[4])
            raise
