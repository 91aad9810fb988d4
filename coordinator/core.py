"""The coordinator's handlers: plain methods over its state; the gRPC servicer only translates.

One lock guards membership, the open round and results; a condition wakes collectors when a round
commits. The outer step runs at commit under the lock (the same ``Reference.apply`` every node runs),
then the new state is persisted before any collector can see the result.
"""
from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from node import membership as policy
from node.runfile import RunFile
from coordinator.errors import (BadPayload, Conflict, Full, NotSubmitted, Refused, ResultGone, StillOpen, Truncated,
                                Unauthorized, UnknownNode, WrongRound)
from coordinator.evaluator import Evaluator
from node.membership import Member
from coordinator.store import Store
from coordinator.uploads import RESUME_KEY, Upload, append_chunk, check_first_chunk
from node import wire
from node.config import diff_configs
from node.errors import ConfigError, PayloadError
from node.membership import CloseKind
from node.roundlog import RoundRow
from node.tasks import load_task
from node.tasks.base import build_seeded
from node.train.reference import Reference

log = logging.getLogger(__name__)
PROTOCOL_VERSION = 1
STATE_CHUNK = 1 << 20


@dataclass
class Committed:
    round: int
    frames: dict[str, bytes]  # member name → frame, sorted
    fingerprint: str
    reason: str
    aggregate: bytes | None = None  # result "aggregate": the one dense frame every member receives


@dataclass
class Chunk:
    """One SubmitChunk, transport-neutral."""

    node_id: str
    round: int
    offset: int
    total_size: int
    data: bytes
    train_loss: float = float("nan")


class CoordinatorCore:
    def __init__(self, cfg: RunFile, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg, self.store, self.clock = cfg, store, clock
        run = cfg.run
        self.task = load_task(run.task.name, **run.task.params)
        model = build_seeded(self.task, run.seed)
        self.reference = Reference.for_model(run, model)  # trainable parameters and buffers
        self.config_hash = run.config_hash(self.task.fingerprint)
        self.model_digest = self.reference.digest()
        problem = store.check_identity(run.run_id, self.config_hash)
        if problem:
            raise ConfigError(problem)
        committed, blob = store.latest()
        if blob is not None:
            self.reference.load_bytes(blob)
            log.info("resumed run %s after %d committed rounds (fingerprint %s)", run.run_id, committed,
                     self.reference.fingerprint())
        self.limit = wire.max_frame_size(self.reference.codec, self.reference.spec, self.reference.buffer_spec)
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.members: dict[str, Member] = store.load_members(clock())
        self.open_round = self.reference.committed_rounds
        self.uploads: dict[str, Upload] = {}
        self.submitted: dict[str, tuple[bytes, float, float]] = {}  # node id → (frame, at, loss)
        self.submitter_names: dict[str, str] = {}  # node id → name, kept if the member leaves before commit
        self.observers: set[str] = set()  # members that observe the open round without a payload: not waited for
        self.first_submit_at: float | None = None
        self.first_submits: dict[int, float] = {}  # recent closed round → time of its first payload
        self.late_noted: set[tuple[str, int]] = set()
        self.deadline: float | None = None
        self.deadline_reason = ""
        self.spreads: deque[float] = deque(maxlen=cfg.deadline.history)
        self.results: OrderedDict[int, Committed] = OrderedDict()
        self.recent: deque[RoundRow] = deque(store.recent_rounds(20), maxlen=20)
        # Rounds every member made: their first-to-last submission spread seeds the adaptive deadline after a restart.
        self.spreads.extend(row.duration_s for row in self.recent if row.close == CloseKind.ALL_SUBMITTED.value)
        self._state_cache: tuple[int, bytes] | None = None
        self._last_reason = ""
        self.evaluator = Evaluator(self.task, model, self._record_val_loss) if cfg.eval_every else None

    # -- run and membership --------------------------------------------------------------------------
    def run_info(self, protocol_version: int) -> dict[str, Any]:
        return {"run_id": self.cfg.run.run_id, "config_json": json.dumps(self.cfg.run.to_dict()),
                "config_hash": self.config_hash, "task_fingerprint": self.task.fingerprint,
                "model_digest": self.model_digest, "protocol_version": PROTOCOL_VERSION}

    def join(self, name: str, protocol_version: int, config_json: str, config_hash: str, task_fingerprint: str,
             digest: str, capabilities: Iterable[str], join_token: str) -> dict[str, Any]:
        mp = self.cfg.membership
        if protocol_version != PROTOCOL_VERSION:
            raise Refused(f"protocol version {protocol_version} is not supported; this coordinator speaks {PROTOCOL_VERSION}")
        self._authorize(join_token)
        if not name or len(name) > 128:
            raise Refused("node_name must be 1–128 characters")
        try:
            theirs = json.loads(config_json) if config_json else None
        except json.JSONDecodeError as exc:
            raise Refused(f"config_json is not valid JSON: {exc}") from None
        if theirs is not None:
            diffs = diff_configs(theirs, self.cfg.run.to_dict())
            if diffs:
                raise Refused("config differs from the run's (node vs run): " + "; ".join(diffs))
        if task_fingerprint != self.task.fingerprint:
            raise Refused(f"task fingerprint differs: node {task_fingerprint[:16]} vs run {self.task.fingerprint[:16]} "
                          "(different data, e.g. another Python version's standard library, or task parameters)")
        if digest != self.model_digest:
            raise Refused(f"model tensors differ: node digest {digest} vs run {self.model_digest}")
        if config_hash != self.config_hash:
            raise Refused(f"config hash differs: node {config_hash} vs run {self.config_hash}")
        with self.lock:
            decision = policy.admit(self.members, name, mp)
            if not decision.act:
                raise (Full if len(self.members) >= mp.max_nodes else Conflict)(decision.reason)
            now = self.clock()
            # A node joining before anyone submitted starts with this round; later joiners with the next one.
            # Before the run has started (see _waiting_to_start) every joiner enters round 0.
            first = (self.open_round if (not self.submitted and not self.uploads) or self._waiting_to_start()
                     else self.open_round + 1)
            shard = policy.free_shard(self.members.values(), mp.max_nodes)
            assert shard is not None, "admit() bounds members by max_nodes"
            node_id = secrets.token_hex(16)
            self.members[node_id] = Member(node_id, name, first, shard, time.time(), now, tuple(capabilities))
            self.store.save_members(self.members)
            log.info("[round=%d] join %s (shard %d, first round %d)", self.open_round, name, shard, first)
            return {"node_id": node_id, "lease_ms": int(mp.lease_s * 1000),
                    "heartbeat_interval_ms": int(mp.heartbeat_s * 1000), "current_round": self.open_round,
                    "first_round": first, "committed_rounds": self.reference.committed_rounds,
                    "config_json": json.dumps(self.cfg.run.to_dict()), "shard": shard, "num_shards": mp.max_nodes}

    def _authorize(self, join_token: str) -> None:
        token = self.cfg.membership.join_token
        if token and not secrets.compare_digest(join_token, token):
            raise Unauthorized("join token missing or wrong for this run")

    def _member(self, node_id: str) -> Member:
        m = self.members.get(node_id)
        if m is None:
            raise UnknownNode(f"unknown node id {node_id[:8]}…: never joined, left, or its lease expired; join again")
        return m

    def heartbeat(self, node_id: str) -> dict[str, Any]:
        with self.lock:
            self._member(node_id).last_heartbeat = self.clock()
            return {"current_round": self.open_round, "committed_rounds": self.reference.committed_rounds,
                    "lease_ms": int(self.cfg.membership.lease_s * 1000)}

    def leave(self, node_id: str, reason: str) -> None:
        with self.lock:
            m = self._member(node_id)
            del self.members[node_id]
            self.uploads.pop(node_id, None)
            self.store.save_members(self.members)
            log.info("[round=%d] leave %s: %s", self.open_round, m.name, reason or "no reason given")
            self._maybe_close()

    def tick(self) -> None:
        """Expire leases and close a round whose deadline passed; called periodically."""
        with self.lock:
            for node_id, reason in policy.expired_members(self.clock(), self.members, self.cfg.membership):
                del self.members[node_id]
                self.uploads.pop(node_id, None)
                log.warning("[round=%d] lease expired: %s", self.open_round, reason)
                self.store.save_members(self.members)
            self._maybe_close()

    # -- submissions ---------------------------------------------------------------------------------
    def submit(self, chunks: Iterable[Chunk]) -> dict[str, Any]:
        up: Upload | None = None
        for chunk in chunks:
            if up is None:
                up = self._start_upload(chunk)
            with self.lock:
                append_chunk(up, chunk.node_id, chunk.round, chunk.offset, chunk.total_size, chunk.data)
        if up is None:
            raise BadPayload("empty upload stream: send at least one chunk")
        if up.duplicate_of is not None:
            if not up.duplicate_of.startswith(bytes(up.data)):
                raise Conflict(f"a different payload for round {up.round} was already accepted from this node")
            if not up.complete:  # repeats are not kept for resumption: send it whole
                raise Truncated(f"repeated upload ended at byte {up.received} of {up.total}; resend from offset 0",
                                {RESUME_KEY: "0"})
            return {"round": up.round, "received_bytes": up.total, "accepted": True}
        if not up.complete:
            raise Truncated(f"stream ended at byte {up.received} of {up.total}; resume from offset {up.received}",
                            {RESUME_KEY: str(up.received)})
        return self._finish_upload(up)

    def _start_upload(self, chunk: Chunk) -> Upload:
        with self.lock:
            m = self._member(chunk.node_id)
            self._check_round(m, chunk.round)
            check_first_chunk(chunk.total_size, self.limit)
            if chunk.node_id in self.submitted:
                # A retry after a lost response: take the whole stream, accept only the same bytes.
                return Upload(chunk.node_id, chunk.round, chunk.total_size, duplicate_of=self.submitted[chunk.node_id][0])
            up = self.uploads.get(chunk.node_id)
            if up is None or up.round != chunk.round or up.total != chunk.total_size or chunk.offset == 0:
                up = self.uploads[chunk.node_id] = Upload(chunk.node_id, chunk.round, chunk.total_size)
            up.loss = chunk.train_loss
            return up

    def _check_round(self, m: Member, round_: int) -> None:
        if round_ < self.open_round:
            self._note_late(m, round_)
            raise WrongRound(f"round {round_} is closed (the open round is {self.open_round}); keep the update in "
                             "error feedback and collect the round's result")
        if round_ > self.open_round:
            raise WrongRound(f"round {round_} is not open yet (the open round is {self.open_round})")
        if m.first_round > round_:
            raise WrongRound(f"{m.name} joined for round {m.first_round}; it cannot contribute to round {round_}")

    def _note_late(self, m: Member, round_: int) -> None:
        """A member that was waited for sent its payload after the round closed: how late it was (from the round's
        first payload) joins the spread history, so the adaptive deadline learns to wait for a steady straggler
        (one late payload among ``history`` rounds moves a high quantile little). Once per member and round."""
        first = self.first_submits.get(round_)
        if first is None or m.first_round > round_ or (m.node_id, round_) in self.late_noted:
            return
        self.late_noted.add((m.node_id, round_))
        self.spreads.append(self.clock() - first)
        log.info("[round=%d] %s's payload came %.2f s after the round's first: the deadline will adapt", round_,
                 m.name, self.clock() - first)

    def _finish_upload(self, up: Upload) -> dict[str, Any]:
        frame = bytes(up.data)
        with self.lock:
            m = self._member(up.node_id)
            self.uploads.pop(up.node_id, None)
        try:
            env = wire.unpack(frame, self.reference.codec, self.reference.spec, self.cfg.run.run_id, up.round,
                              limit=self.limit, extra_spec=self.reference.buffer_spec)
        except PayloadError as exc:
            raise BadPayload(f"payload rejected: {exc}") from None
        if env.sender != m.name:
            raise BadPayload(f"payload names sender {env.sender!r} but node {m.name!r} sent it")
        with self.lock:
            self._member(up.node_id)
            self._check_round(m, up.round)
            now = self.clock()
            self.submitted[up.node_id] = (frame, now, up.loss)
            self.submitter_names[up.node_id] = m.name
            m.bytes_in += len(frame)
            m.last_loss = up.loss
            if self.first_submit_at is None:
                self.first_submit_at = now
                wait, self.deadline_reason = policy.round_wait(list(self.spreads), self.cfg.deadline)
                newcomers = sorted(n.name for n in self.members.values() if 0 < n.first_round == up.round)
                if newcomers and not self.cfg.run.recipe.overlap and self.cfg.deadline.max_wait_s > wait:
                    # a member's first round: it fetched the state and started its inner steps after the others
                    # (a join under way, a rejoin), so the adaptive deadline, learnt from members in step, would
                    # close the round without it and waste those steps. Wait the longest wait for it, once per
                    # join (the round closes as soon as it arrives; a newcomer that dies is dropped with its lease).
                    # With overlap a joiner instead steps in at a round boundary (node/daemon.py, _step_in) and
                    # observes the rounds before: waiting for it there would stall the run.
                    wait = self.cfg.deadline.max_wait_s
                    self.deadline_reason = f"the longest wait: first round of {', '.join(newcomers)}"
                self.deadline = now + wait
                log.info("[round=%d] first payload from %s; deadline in %.1f s (%s)", up.round, m.name, wait,
                         self.deadline_reason)
            self._maybe_close()
            return {"round": up.round, "received_bytes": len(frame), "accepted": True}

    # -- closing rounds ------------------------------------------------------------------------------
    def _waiting_to_start(self) -> bool:
        return not policy.run_started(self.open_round, len(self.members), self.cfg.membership).act

    def _expected(self, round_: int) -> set[str]:
        """The members whose payload the open round waits for: those in it, less those observing it once the round
        holds a quorum (``min_nodes`` payloads; an observer never lets a round commit below it)."""
        expected = policy.expected_members(self.members, round_)
        if len(self.submitted) >= self.cfg.membership.min_nodes:
            expected -= self.observers
        return expected

    def _maybe_close(self) -> None:
        started = policy.run_started(self.open_round, len(self.members), self.cfg.membership)
        if not started.act:
            if started.reason != self._last_reason:
                log.info("[round=%d] %s", self.open_round, started.reason)
            self._last_reason = started.reason
            return
        expected = self._expected(self.open_round)
        decision = policy.decide_close(self.clock(), expected, set(self.submitted), self.deadline, self.cfg.membership,
                                       observing=self.observers)
        if decision.kind is CloseKind.QUORUM_UNREACHABLE:
            log.warning("[round=%d] %s", self.open_round, decision.reason)
        if not decision.close:
            if decision.reason != self._last_reason and decision.kind is CloseKind.NO_QUORUM:
                log.warning("[round=%d] %s", self.open_round, decision.reason)
            self._last_reason = decision.reason
            return
        self._commit(decision)

    def _commit(self, decision: policy.CloseDecision) -> None:
        r, now = self.open_round, self.clock()
        names = {nid: self.submitter_names[nid] for nid in decision.members}
        frames = dict(sorted((names[nid], self.submitted[nid][0]) for nid in decision.members))
        envelopes, rejected = self.reference.unpack(frames, r)
        assert not rejected, f"frames were validated on arrival: {rejected}"
        aggregate_frame = None
        if self.cfg.result == "aggregate":
            aggregate_frame, decoded = self.reference.pack_aggregate(self.reference.reduce(envelopes), r,
                                                                    self.cfg.aggregate_codec)
            self.reference.step(decoded, r)
        else:
            self.reference.apply(envelopes, r)
        fingerprint = self.reference.fingerprint()
        times = [self.submitted[nid][1] for nid in decision.members]
        losses = [self.submitted[nid][2] for nid in decision.members if not math.isnan(self.submitted[nid][2])]
        bytes_in = sum(len(f) for f in frames.values())
        # what the round's result costs to hand out: every other member's frame to each member, or one aggregate
        bytes_out = (len(frames) * len(aggregate_frame) if aggregate_frame is not None
                     else (len(frames) - 1) * bytes_in)
        row = RoundRow(r, time.time(), list(frames), decision.reason, fingerprint, bytes_in, bytes_out,
                       now - (self.first_submit_at or now), sum(losses) / len(losses) if losses else float("nan"),
                       float("nan"), decision.kind.value)
        for nid in decision.members:
            if nid in self.members:
                self.members[nid].rounds_contributed += 1
        self.store.commit_round(row, self.reference.to_bytes(), frames, self.members, aggregate_frame)
        if set(decision.members) >= self._expected(r):
            self.spreads.append(max(times) - min(times))
        self.results[r] = Committed(r, frames, fingerprint, decision.reason, aggregate_frame)
        while len(self.results) > self.cfg.keep_results:
            self.results.popitem(last=False)
        self.recent.append(row)
        self.open_round = r + 1
        self.submitted.clear()
        self.submitter_names.clear()
        self.observers.clear()
        self.uploads = {k: u for k, u in self.uploads.items() if u.round > r}
        if self.first_submit_at is not None:
            self.first_submits[r] = self.first_submit_at
        for old_round in [k for k in self.first_submits if k < r - self.cfg.keep_results]:
            del self.first_submits[old_round]
        self.late_noted = {(n, k) for n, k in self.late_noted if k >= r - self.cfg.keep_results}
        self.first_submit_at = self.deadline = None
        self._last_reason = ""
        log.info("[round=%d] committed: members=%d in=%dB loss=%.4f fp=%s (%s)", r, len(frames), bytes_in,
                 row.mean_loss, fingerprint, decision.reason)
        if self.evaluator is not None and (r + 1) % self.cfg.eval_every == 0:
            self.evaluator.submit(r, self.reference.tensors, self.reference.buffers)
        self.cond.notify_all()

    def _record_val_loss(self, round_: int, val: float) -> None:
        with self.lock:  # the store's connection is shared: never write inside another thread's commit
            for row in self.recent:
                if row.round == round_:
                    row.val_loss = val
            self.store.set_val_loss(round_, val)
        log.info("[round=%d] reference val_loss=%.4f", round_, val)

    # -- results and state ---------------------------------------------------------------------------
    def collect(self, node_id: str, round_: int, wait_s: float, submitted: bool) -> tuple[Committed, list[str]]:
        """Block until ``round_`` closes (≤ wait_s); returns the result and the members to send (not the caller)."""
        end = self.clock() + max(0.0, wait_s)
        with self.cond:
            m = self._member(node_id)
            if round_ > self.open_round:
                raise WrongRound(f"round {round_} is not open yet (the open round is {self.open_round})")
            if (not submitted and round_ == self.open_round and node_id not in self.submitted
                    and node_id not in self.uploads and node_id not in self.observers):
                # it takes this round's result without contributing (a joiner catching up or stepping in, a node
                # that skips a round to get back in step): the round need not wait for its payload
                self.observers.add(node_id)
                log.info("[round=%d] %s observes this round: not waiting for its payload", round_, m.name)
                self._maybe_close()
            while round_ == self.open_round:
                if submitted and node_id not in self.submitted and node_id not in self.uploads:
                    raise NotSubmitted(f"no payload from {m.name} for round {round_} is held (the coordinator "
                                       "may have restarted): submit it again", {"lowband-not-submitted": "1"})
                remaining = end - self.clock()
                if remaining <= 0:
                    raise StillOpen(f"round {round_} is still open: {self._last_reason or 'waiting'}")
                self.cond.wait(timeout=min(remaining, 1.0))
                m = self._member(node_id)
            result = self.results.get(round_)
            if result is None:
                frames = self.store.result(round_)
                if frames is None or round_ != self.reference.committed_rounds - 1:
                    raise ResultGone(f"the result of round {round_} is no longer held (the run is at round "
                                     f"{self.open_round}); fetch the state instead")
                result = Committed(round_, dict(sorted(frames.items())), self.reference.fingerprint(), "restored",
                                   self.store.aggregate(round_))
            if result.aggregate is not None:
                m.bytes_out += len(result.aggregate)
                return result, []
            to_send = [name for name in result.frames if name != m.name]
            m.bytes_out += sum(len(result.frames[n]) for n in to_send)
            return result, to_send

    def state_blob(self) -> tuple[int, bytes, str]:
        with self.lock:
            committed = self.reference.committed_rounds
            if self._state_cache is None or self._state_cache[0] != committed:
                self._state_cache = (committed, self.reference.to_bytes())
            return committed, self._state_cache[1], self.reference.fingerprint()

    def fetch_state(self, node_id: str, offset: int, join_token: str = "") -> Iterable[dict[str, Any]]:
        """The state blob from ``offset``, to a member, or (empty ``node_id``) to a node that has not joined yet but
        holds the run's join token: it downloads while it starts up, which on a slow link is most of a join."""
        if node_id:
            with self.lock:
                self._member(node_id)
        else:
            self._authorize(join_token)
        committed, blob, fingerprint = self.state_blob()
        if offset > len(blob):
            raise WrongRound(f"offset {offset} is past the end of the {len(blob)}-byte state")
        with self.lock:
            if node_id in self.members:
                self.members[node_id].bytes_out += len(blob) - offset
        for start in range(offset, max(len(blob), offset + 1), STATE_CHUNK):
            yield {"committed_rounds": committed, "total_size": len(blob), "offset": start,
                   "data": blob[start:start + STATE_CHUNK], "reference_fingerprint": fingerprint}

    def status(self) -> dict[str, Any]:
        with self.lock:
            now = self.clock()
            return {"run_id": self.cfg.run.run_id, "recipe": self.cfg.run.recipe.name, "current_round": self.open_round,
                    "committed_rounds": self.reference.committed_rounds,
                    "deadline_in_s": (self.deadline - now) if self.deadline is not None else -1.0,
                    "members": [m for m in self.members.values()], "recent": list(self.recent),
                    "reference_fingerprint": self.reference.fingerprint(),
                    "submitted": sorted(self.members[n].name for n in self.submitted if n in self.members), "now": now}

    def close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.stop()
