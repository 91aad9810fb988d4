"""The coordinator's rounds: uploads, the decision to close, the commit, and results for collectors.

``Rounds`` is the base of ``CoordinatorCore`` (coordinator/core.py), which adds membership; both share one lock.
A closing round is reduced without touching the live state (coordinator/commit.py), made durable — its
write-ahead record, then its row: the commit point (coordinator/store.py) — and only then stepped in place. A store
that fails leaves the live state untouched, the round open with its payloads, the coordinator NOT_SERVING and
refusing round calls (UNAVAILABLE, with the reason) until a retry persists it — the step is applied exactly once.
Snapshots: every ``rounds.snapshot_every`` rounds, off the commit path (coordinator/snapshot.py); a restart replays
the rounds logged after the newest (coordinator/replay.py); joiners download one and catch up from the log.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import sqlite3
import statistics
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from coordinator.accumulate import RunningReduce
from coordinator.commit import Persistence, applied_as, apply_prepared, held_frames, prepare_reduced, prepare_round
from coordinator.errors import BadPayload, BadSignature, Conflict, Late, Truncated, Unavailable, WrongRound
from coordinator.evaluator import Evaluator
from coordinator.replay import restore
from coordinator.results import Committed, Results, Waiter  # noqa: F401  (re-exported)
from coordinator.snapshot import Snapshotter
from coordinator.store import Store
from coordinator.uploads import RESUME_KEY, Upload, append_chunk, check_first_chunk
from coordinator.wal_stream import HeldFrame, StreamedRecord
from node import membership as policy
from node import wire
from node.errors import ConfigError, PayloadError, SignatureError
from node.keyring import KeyRing
from node.membership import CloseKind, Member
from node.roundlog import RoundRow
from node.runfile import RunFile
from node.tasks import load_task
from node.tasks.base import build_seeded
from node.train.reference import Reference

log = logging.getLogger(__name__)
STATE_CHUNK = 1 << 20
RESULTS_IN_MEMORY = 2  # recent results held in memory; up to keep_results are served from the write-ahead log


@dataclass
class Chunk:
    """One SubmitChunk, transport-neutral."""

    node_id: str
    round: int
    offset: int
    total_size: int
    data: bytes
    train_loss: float = float("nan")


class Rounds(Results):
    lock: threading.RLock
    members: dict[str, Member]
    db_errors = sqlite3.Error

    def __init__(self, cfg: RunFile, store: Store, clock: Callable[[], float]) -> None:
        self.cfg, self.store, self.clock = cfg, store, clock
        run = cfg.run
        self.task = load_task(run.task.name, **run.task.params)
        model = build_seeded(self.task, run.seed)
        self.reference = Reference.for_model(run, model, downlink_feedback=cfg.compressed_downlink)  # stepped in place
        self.config_hash = run.config_hash(self.task.fingerprint)
        self.model_digest = self.reference.digest()
        problem = store.check_identity(run.run_id, self.config_hash, run.legacy_config_hash(self.task.fingerprint),
                                       run.to_dict())
        if problem:
            raise ConfigError(problem)
        store.keep = cfg.keep_results  # round records kept for late collectors (and joiners catching up)
        if store.last_round() is not None:
            restore(self.reference, store, applied_as(cfg))  # raises ReplayError: refuse to serve a wrong state
            log.info("resumed run %s after %d committed rounds (fingerprint %s)", run.run_id,
                     self.reference.committed_rounds, self.reference.fingerprint())
        if cfg.eval_every == 0:
            del model  # the reference holds its own copy: the built model need not stay resident
        self.limit = wire.max_frame_size(self.reference.codec, self.reference.spec, self.reference.buffer_spec)
        self.open_round = self.reference.committed_rounds
        self.uploads: dict[str, Upload] = {}
        self.submitted: dict[str, tuple[bytes | HeldFrame, float, float]] = {}  # node id → (frame, at, loss)
        self.submitter_names: dict[str, str] = {}  # node id → name, kept if the member leaves before commit
        self.submitter_keys: dict[str, bytes] = {}  # node id → the key its frame was verified with
        self.observers: set[str] = set()  # members that observe the open round without a payload: not waited for
        self.first_submit_at: float | None = None
        self.first_submits: dict[int, float] = {}  # recent closed round → time of its first payload
        self.late_noted: set[tuple[str, int]] = set()
        self.deadline: float | None = None
        self.deadline_reason = ""
        self.spreads: deque[float] = deque(maxlen=cfg.deadline.history)
        self.commit_times: deque[float] = deque(maxlen=cfg.deadline.history + 1)  # clock() of recent commits
        self.granted: OrderedDict[bytes, None] = OrderedDict()  # keys whose first round already waited longer
        self.results: OrderedDict[int, Committed] = OrderedDict()
        self.restored: OrderedDict[int, Committed] = OrderedDict()  # results read back from records (results.py)
        self.recent: deque[RoundRow] = deque(store.recent_rounds(20), maxlen=20)
        # Rounds every member made: their first-to-last submission spread seeds the adaptive deadline after a restart.
        self.spreads.extend(row.duration_s for row in self.recent if row.close == CloseKind.ALL_SUBMITTED.value)
        self.snapshots = Snapshotter(store, cfg.snapshot_every, self.lock)
        self.closed = False
        self.commit_timing: dict[str, float] = {}  # seconds spent in each part of the last commit
        self._last_reason = ""
        self.persistence = Persistence()
        self.commit_pending = False  # a round is ready to commit but could not be persisted yet
        self.waiters: set[Waiter] = set()  # collectors waiting for the open round
        self.evaluator = Evaluator(self.task, model, self._record_val_loss) if cfg.eval_every else None
        self._fingerprint: tuple[int, str] = (-1, "")  # (committed rounds, fingerprint) last hashed
        self.running = self._new_running()
        self.streamed: StreamedRecord | None = None  # the open round's record, written as its frames come
        if self.snapshots.due(self.reference.committed_rounds) and self.reference.committed_rounds:
            with self.lock:  # after a long replay: bound the next one
                self.snapshots.start(self.reference, self.fingerprint())

    def fingerprint(self) -> str:
        """The reference's fingerprint, hashed once per committed round (Status asks for it on every call; hashing a
        large state takes seconds, under the lock)."""
        committed = self.reference.committed_rounds
        if self._fingerprint[0] != committed:
            self._fingerprint = (committed, self.reference.fingerprint())
        return self._fingerprint[1]

    # -- submissions ---------------------------------------------------------------------------------
    def _new_running(self) -> RunningReduce | None:
        """The open round's reduce, taken frame by frame as they are accepted where it can be (accumulate.py)."""
        return RunningReduce(self.reference) if RunningReduce.applies(self.reference, applied_as(self.cfg)) else None

    def _serving(self) -> None:
        if not self.persistence.ok:
            raise Unavailable(f"not serving rounds: {self.persistence.error}; retrying — try again later")

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
            held = up.duplicate_of  # the frame accepted, or (kept on disk only) its size and digest
            differs = (up.complete and not held.same_as(bytes(up.data)) if isinstance(held, HeldFrame)
                       else not held.startswith(bytes(up.data)))
            if differs:
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
            self._serving()
            up = self.uploads.get(chunk.node_id)
            if up is None or up.round != chunk.round or up.total != chunk.total_size or chunk.offset == 0:
                up = self.uploads[chunk.node_id] = Upload(chunk.node_id, chunk.round, chunk.total_size)
            up.loss = chunk.train_loss
            return up

    def _member(self, node_id: str) -> Member:
        raise NotImplementedError

    def _check_round(self, m: Member, round_: int) -> None:
        if round_ < self.open_round:
            self._note_late(m, round_)
            raise Late(f"round {round_} is closed (the open round is {self.open_round}); keep the update in "
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
            # the members' keys: a frame is checked against the key its sender joined with (docs/algorithms.md §11)
            # before it is decoded; the others' name a frame relayed from another member
            keys = {n.name: n.public_key for n in self.members.values() if n.public_key} if m.public_key else None
        try:
            env = wire.unpack(frame, self.reference.codec, self.reference.spec, self.cfg.run.run_id, up.round,
                              limit=self.limit, extra_spec=self.reference.buffer_spec, sender=m.name,
                              keys=KeyRing.of(keys))
        except SignatureError as exc:  # counted apart (coordinator/metrics.py); the same status and text
            raise BadSignature(f"payload rejected: {exc}") from None
        except PayloadError as exc:
            raise BadPayload(f"payload rejected: {exc}") from None
        with self.lock:
            self._member(up.node_id)
            self._check_round(m, up.round)
            if up.node_id in self.submitted:  # a second upload of this session overtook this one: the first counts
                raise Conflict(f"a payload for round {up.round} was already accepted from this node")
            if any(name == m.name for nid, name in self.submitter_names.items() if nid != up.node_id):
                # an earlier session under this name (before a restart) submitted already: one frame per name
                raise Conflict(f"a frame from {m.name} is in round {up.round} already (sent before this node "
                               "restarted); collect the round's result")
            held: bytes | HeldFrame = frame
            if self.running is not None:  # reduced as it comes, kept on disk only (accumulate.py, wal_stream.py)
                try:
                    self.streamed = self.streamed or self.store.stream_record(up.round)
                    self.streamed.add(m.name, frame)
                except OSError as exc:
                    raise Unavailable(f"cannot persist the frame: {type(exc).__name__}: {exc}; try again later")
                self.running.add(env)  # under the lock: the round cannot close between this and ``submitted``
                held = HeldFrame.of(frame)
            now = self.clock()
            self.submitted[up.node_id] = (held, now, up.loss)
            self.submitter_names[up.node_id] = m.name
            self.submitter_keys[up.node_id] = m.public_key
            m.bytes_in += len(frame)
            m.last_loss = up.loss
            m.contributed_round = m.active_round = up.round
            m.contributed_at = now
            if self.first_submit_at is None:
                self.first_submit_at = now
                self._set_deadline(now, up.round, m.name)
            self._maybe_close()
            return {"round": up.round, "received_bytes": len(frame), "accepted": True}

    def _forget_open_frames(self, round_: int) -> None:
        """The open round's streamed record failed its fsync: the frames it holds on disk are unknown, and they are
        nowhere else (wal_stream.py). The round forgets them — its members are told at Collect that no payload of
        theirs is held (NotSubmitted) and send it again, as after a restart — rather than commit from that file."""
        assert self.streamed is not None
        log.warning("[round=%d] the record of its %d frame(s) failed its fsync: they are dropped and sent again",
                    round_, len(self.submitted))
        try:
            self.streamed.discard()
        except OSError as exc:  # its temporary file is removed at the next start (Store.cut_tail); a new one replaces it
            log.warning("[round=%d] the failed record's temporary file stays: %s", round_, exc)
        self.running, self.streamed = self._new_running(), None
        self.submitted.clear()
        self.submitter_names.clear()
        self.submitter_keys.clear()
        self.commit_pending = False  # nothing left to commit: serving again once the disk writes
        self.first_submit_at = self.deadline = None

    def _set_deadline(self, now: float, round_: int, first_name: str) -> None:
        """The round's first payload arrived: its deadline is the adaptive wait, lengthened for newcomers that earned
        it (``policy.newcomer_wait``): their first round, they downloaded the state, and their key never had one.
        With overlap a joiner instead steps in at a round boundary (node/daemon.py, _step_in): no longer wait."""
        wait, self.deadline_reason = policy.round_wait(list(self.spreads), self.cfg.deadline)
        eligible = [] if self.cfg.run.recipe.overlap else [
            n for n in self.members.values()
            if 0 < n.first_round == round_ and n.holds_state and n.public_key not in self.granted]
        longer, why = policy.newcomer_wait(wait, self._round_period(), [n.name for n in eligible], self.cfg.deadline)
        if why:
            wait, self.deadline_reason = longer, why
            for n in eligible:
                self.granted[n.public_key] = None
            while len(self.granted) > 4096:
                self.granted.popitem(last=False)
        self.deadline = now + wait
        log.info("[round=%d] first payload from %s; deadline in %.1f s (%s)", round_, first_name, wait,
                 self.deadline_reason)

    def _round_period(self) -> float | None:
        times = list(self.commit_times)
        return statistics.median(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else None

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
        if decision.kind is CloseKind.QUORUM_UNREACHABLE and decision.reason != self._last_reason:
            log.warning("[round=%d] %s", self.open_round, decision.reason)
        if not decision.close:
            if decision.reason != self._last_reason and decision.kind is CloseKind.NO_QUORUM:
                log.warning("[round=%d] %s", self.open_round, decision.reason)
            self._last_reason = decision.reason
            return
        if self.persistence.may_try(self.clock()):
            self._commit(decision)

    def _commit(self, decision: policy.CloseDecision) -> None:
        """Reduce the round without touching the live state, make it durable (write-ahead record, then row: the
        commit point), then step in place (coordinator/commit.py). A store failure leaves everything as it was: the
        round stays open with its payloads and is retried."""
        r, now = self.open_round, self.clock()
        names = {nid: self.submitter_names[nid] for nid in decision.members}
        frames = dict(sorted((names[nid], self.submitted[nid][0]) for nid in decision.members))
        keys = {names[nid]: self.submitter_keys[nid] for nid in decision.members if self.submitter_keys.get(nid)}
        applied = applied_as(self.cfg)
        started, cpu0 = time.perf_counter(), time.thread_time()  # the commit's parts, for `lowband bench commit`
        running = self.running
        if running is not None and sorted(running.order) == list(frames):  # reduced as the frames came
            applied["order"] = list(running.order)
            prepared = prepare_reduced(self.reference, running.aggregate(), r, applied)
        else:
            prepared = prepare_round(self.reference, frames, r, applied, KeyRing.of(keys))
        prepared_at = time.perf_counter()
        times = [self.submitted[nid][1] for nid in decision.members]
        losses = [self.submitted[nid][2] for nid in decision.members if not math.isnan(self.submitted[nid][2])]
        bytes_in = sum(len(f) for f in frames.values())
        # what the round's result costs to hand out: every other member's frame to each member, or one aggregate
        bytes_out = (len(frames) * len(prepared.frame) if prepared.frame is not None else (len(frames) - 1) * bytes_in)
        report = getattr(prepared.aggregate, "report", None)
        # the fingerprint of the state after the round is known once the step is taken, after the commit point
        row = RoundRow(r, time.time(), list(frames), decision.reason, "", bytes_in, bytes_out,
                       now - (self.first_submit_at or now), sum(losses) / len(losses) if losses else float("nan"),
                       float("nan"), decision.kind.value, report.to_json() if report is not None else None)
        after = {nid: dataclasses.replace(m, rounds_contributed=m.rounds_contributed + (nid in decision.members))
                 for nid, m in self.members.items()}
        try:
            if self.streamed is not None and "order" in applied:
                self.store.commit_streamed(row, self.streamed, after, prepared.frame, keys, applied)
            else:
                self.store.commit_round(row, frames, after, prepared.frame, keys, applied)
        except (OSError, sqlite3.Error) as exc:
            self.commit_pending = True
            self.persistence.failed(now, f"round {r}", exc)
            if self.streamed is not None and self.streamed.damaged:
                self._forget_open_frames(r)
            return
        durable_at = time.perf_counter()
        self.commit_pending = False
        self.persistence.succeeded()
        self.snapshots.freeze()  # a snapshot still being written keeps the state it was started at
        frozen_at = time.perf_counter()
        aggregate_frame = prepared.frame
        apply_prepared(self.reference, prepared)  # in place: the round is applied, once
        stepped_at = time.perf_counter()
        fingerprint = row.fingerprint = self.reference.fingerprint()
        self._fingerprint = (self.reference.committed_rounds, fingerprint)
        self.store.set_fingerprint(row)
        self.commit_timing = {"reduce_s": prepared_at - started, "durable_s": durable_at - prepared_at,
                              "freeze_s": frozen_at - durable_at, "step_s": stepped_at - frozen_at,
                              "fingerprint_s": time.perf_counter() - stepped_at, "cpu_s": time.thread_time() - cpu0}
        for nid in decision.members:
            if nid in self.members:
                self.members[nid].rounds_contributed += 1
        if set(decision.members) >= self._expected(r):
            self.spreads.append(max(times) - min(times))
        self.commit_times.append(now)
        self.results[r] = Committed(r, held_frames(frames, aggregate_frame), fingerprint, decision.reason,
                                    aggregate_frame, keys)
        while len(self.results) > min(self.cfg.keep_results, RESULTS_IN_MEMORY):  # older: from their records
            self.results.popitem(last=False)
        self.recent.append(row)
        self.open_round = r + 1
        self.submitted.clear()
        self.running, self.streamed = self._new_running(), None
        self.submitter_names.clear()
        self.submitter_keys.clear()
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
        if r + 1 == self.cfg.run.rounds:
            log.info("run %s complete: all %d rounds committed (fingerprint %s); the state stays served for joins, "
                     "status and `lowband export --state-dir`", self.cfg.run.run_id, r + 1, fingerprint)
        if self.evaluator is not None and (r + 1) % self.cfg.eval_every == 0:
            self.evaluator.submit(r, self.reference.tensors, self.reference.buffers)
        if self.snapshots.due(r + 1) or r + 1 == self.cfg.run.rounds:  # and the final state, for export
            self.snapshots.start(self.reference, fingerprint)
        if report is not None:
            self._account(r, report)
        for waiter in self.waiters:
            waiter.event.set()

    def _account(self, round_: int, report: Any) -> None:
        """The round's accountability report (node/robust/report.py): log each frame the bounds dropped; members it
        evicted are dropped from the run (core.py refuses them at Join)."""
        for name, m in sorted(report.members.items()):
            if m.rejected and not m.rejected.startswith("evicted"):
                log.warning("[round=%d] dropped %s's frame: %s", round_, name, m.rejected)
        for name, reason in sorted(report.evicted.items()):
            self._evict(name, f"evicted at round {round_}: {reason}")

    def _evict(self, name: str, why: str) -> None:
        """Drop member ``name`` from the run (core.py: it is then refused at Join)."""
        raise NotImplementedError

    def _bound_keys(self, names: Iterable[str]) -> dict[str, bytes]:
        """The key each of ``names`` is bound to, where one is (core.py)."""
        raise NotImplementedError

    def _record_val_loss(self, round_: int, val: float) -> None:
        with self.lock:  # the store's connection is shared: never write inside another thread's commit
            for row in self.recent:
                if row.round == round_:
                    row.val_loss = val
            try:
                self.store.set_val_loss(round_, val)
            except (OSError, sqlite3.Error) as exc:
                log.warning("[round=%d] val_loss %.4f not persisted: %s", round_, val, exc)
        log.info("[round=%d] reference val_loss=%.4f", round_, val)

    def state_snapshot(self, wait_s: float = 600.0, at_least: int = 0,
                       waiter: Waiter | None = None) -> tuple[int, Path, str]:  # committed rounds, file, fingerprint
        """What a joiner downloads (``Snapshotter.for_joiner``). Raises Unavailable, or Cancelled once ``waiter`` is."""
        with self.lock:
            committed = self.reference.committed_rounds
        try:
            return self.snapshots.for_joiner(committed, self.cfg.keep_results, lambda: self.snapshots.start(
                self.reference, self.fingerprint()), wait_s, min(at_least, committed), waiter)
        except (TimeoutError, OSError) as exc:
            raise Unavailable(f"the state is not ready for download: {exc}; try again later") from None

    def state_blob(self) -> tuple[int, bytes, str]:
        """(committed rounds, snapshot bytes, fingerprint) for tests and tools (``fetch_state`` streams the file)."""
        committed, path, fingerprint = self.state_snapshot()
        return committed, path.read_bytes(), fingerprint

    def close(self) -> None:
        """Stop: a snapshot being written is finished, and the state of the last committed round snapshotted if it is
        newer than the last snapshot (a restart then replays nothing)."""
        if self.closed:
            return
        self.closed = True
        self.snapshots.wait()
        with self.lock:
            if self.persistence.ok and self.reference.committed_rounds > self.store.latest_snapshot()[0]:
                self.snapshots.start(self.reference, self.fingerprint())
        self.snapshots.wait()
        with self.lock:
            if self.streamed is not None:  # an open round's frames: members submit them again after a restart
                self.streamed.discard()
        if self.evaluator is not None:
            self.evaluator.stop()
