"""The round engine: everything a node does around its inner steps — join, state sync, the exchange of each round
(with overlap on a background thread), applying its outcome, fingerprint checks, catching up, rejoining, checkpoints,
the round log, leaving. It owns no training loop: whoever trains calls ``end_round`` after each round's H inner steps.

Two drivers share it, so there is one round loop in lowband, not two:

- ``NodeDaemon`` (node/daemon.py, ``lowband node``): trains through the ``Task`` seam (``Worker.train``).
- ``Session`` (node/api.py, ``lowband.join``): the user's own loop steps the user's optimizer and calls
  ``session.step()``; every H steps the session calls ``end_round``.

The run is driven through a ``ControlPlane`` (node/transport/control.py): a gRPC coordinator, with
``NodeOptions.dht`` a serverless hivemind DHT, or any plane handed in (an in-process run in tests, wrapped in the fault
seam). Waits are decided on an injected ``Clock`` (node/clock.py).

Identity: the node's one key (``node.key`` in the workdir, node/identity.py) signs its calls, its frames and, in a
serverless run, its DHT records; the worker verifies the other members' frames with the round's member keys.

Each round's record is produced in one place, ``_record``: the ``RoundReport`` returned to the driver, the
``rounds.jsonl`` line and the log line all come from it (node/round_report.py), and ``listeners`` (e.g. metrics) are
called there. A node restored from its checkpoint logs ``{"event": "resumed", "committed_rounds": c}``: rounds from c
on that the log already holds (applied before a kill, after the checkpoint was written) are applied again after it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

from node.clock import SYSTEM_CLOCK, Clock
from node.config import RunConfig, diff_configs
from node.identity import NodeKey
from node.replay_rounds import replay_to
from node.round_report import RoundReport, committed_line, observed_line, robust_entry
from node.tasks.base import Task
from node.train.inner import InnerStats
from node.train.worker import Worker
from node.transport.control import ControlPlane, Identity, JoinInfo, Rejoin
from node.transport.limits import ResultLimits
from node.transport.messages import RoundResult, RoundStatus, Submission
from node.workdir import Workdir

if TYPE_CHECKING:
    from node.transport.dht_control import DhtSettings
    from node.transport.grpc_auth import ClientTls
    from node.transport.state_prefetch import StatePrefetch

log = logging.getLogger("node.daemon")  # the daemon's log lines keep their logger name

STEP_IN_MAX_S = 120.0  # the longest a node entering an overlapped run waits for the others' next round to start


@dataclass
class NodeOptions:
    coordinator: str  # HOST:PORT; unused in DHT mode
    workdir: Path
    name: str = ""
    device: str = "auto"
    run: RunConfig | None = None  # what the operator expects; refused at Join if it differs
    join_token: str = ""
    max_rounds: int | None = None  # stop after this many applied rounds (tests, demos)
    round_timeout_s: float = 3600.0
    dht: DhtSettings | None = None  # serverless: join the run through this DHT (``run`` is then required)
    checkpoint_every: int = 1  # applied rounds between checkpoint writes (one is also written on exit)
    prefetch: StatePrefetch | None = None  # the run's state, downloading since the process started (cmd_node)
    tls: ClientTls | None = None  # the coordinator channel's TLS (None: plaintext; cmd_node allows it on loopback)
    on_record: Callable[[dict[str, Any]], None] | None = None  # told every rounds.jsonl entry (node/metrics.py)


def device_of(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class WorkerSource(Protocol):
    """Where the engine's worker comes from: the daemon builds the task's model, the API wraps the user's."""

    def describe(self, cfg: RunConfig) -> tuple[Task, str]:
        """The run's task and the digest of the model this node presents at Join (node/train/tensors.py)."""

    def build(self, cfg: RunConfig, task: Task, info: JoinInfo, key: NodeKey) -> Worker:
        """The worker, once, after the first Join; ``key`` signs its frames."""


@dataclass
class InFlight:
    """A round whose frame is out: its exchange runs on the engine's exchange thread."""

    round: int
    stats: InnerStats | None  # None: a round only observed, while this node trains the next one (see _step_in)
    started: float
    future: Future[RoundResult]
    reset: str = ""  # the frame was sent after a reset of a poisoned local state (why), see Worker.prepare


class RoundEngine:
    """``plane``: the control plane to use instead of building one from ``opts`` (tests: an in-process run, the fault
    seam); the engine closes it in ``shutdown``. ``clock``: what the engine's waits are decided on."""

    def __init__(self, opts: NodeOptions, stop: threading.Event, source: WorkerSource, *,
                 plane: ControlPlane | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.opts, self.stop, self.source, self.clock = opts, stop, source, clock
        self._given_plane = plane
        self.name = opts.name or f"{socket.gethostname()}-{os.getpid()}"
        self.files = Workdir(Path(opts.workdir), self.name, opts.on_record)
        self.key = NodeKey.load_or_create(self.files.path)  # a restart with the same workdir is the same node
        self.plane: ControlPlane | None = None  # built in join(): starting a DHT can fail, and must be closed
        self.worker: Worker | None = None
        self.cfg: RunConfig | None = None
        self.config_hash = ""
        self.applied = 0
        self.resumed = False  # the worker was restored from this workdir's checkpoint
        self.listeners: list[Callable[[RoundReport], None]] = []  # called with every round's report (metrics)
        self._inflight: InFlight | None = None
        self._late_streak = 0  # consecutive committed rounds without our payload
        # one exchange at a time, off the training thread (with overlap it runs while the next round trains)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exchange")

    # -- lifecycle -----------------------------------------------------------------------------------
    def _make_plane(self) -> ControlPlane:
        if self._given_plane is not None:
            return self._given_plane
        if self.opts.dht is not None:
            from node.transport.dht_control import DhtControl  # hivemind is imported only in DHT mode

            if self.opts.run is None:
                raise ValueError("DHT mode needs the run file: there is no coordinator to hand it out")
            # one identity: the key that writes this node's DHT records signs its frames
            if self.opts.dht.key is None:
                self.opts.dht = dataclasses.replace(self.opts.dht, key=self.key)
            self.key = self.opts.dht.key
            return DhtControl(self.opts.run, self.opts.dht, self.name, self.stop, self.clock)
        from node.transport.grpc_control import GrpcControl

        return GrpcControl(self.opts.coordinator, self.stop, key=self.key, tls=self.opts.tls,
                           token=self.opts.join_token)

    @property
    def _plane(self) -> ControlPlane:
        assert self.plane is not None
        return self.plane

    @property
    def _worker(self) -> Worker:
        assert self.worker is not None
        return self.worker

    def join(self) -> JoinInfo:
        """Build the control plane and join the run; the first time, the worker too. Raises ``JoinRefused``,
        ``Stopped``, and whatever the worker source raises for a model that does not fit the run."""
        if self.plane is None:
            self.plane = self._make_plane()
        cfg = self._plane.get_run_config()
        if self.opts.run is not None:
            if diff_configs(self.opts.run.to_dict(), cfg.to_dict()):
                log.warning("this node's run file differs from the coordinator's; Join will be refused")
            cfg_for_join = self.opts.run
        else:
            cfg_for_join = cfg
        task, digest = self.source.describe(cfg_for_join)
        self.config_hash = cfg_for_join.config_hash(task.fingerprint)
        identity = Identity(self.name, json.dumps(cfg_for_join.to_dict()), self.config_hash, task.fingerprint, digest,
                            (f"device={device_of(self.opts.device)}",), self.opts.join_token, self.key.public)
        info = self._plane.join(identity)
        if self.worker is None:
            self.cfg = cfg
            self.worker = self.source.build(cfg, task, info, self.key)
        limits = ResultLimits.for_model(self.worker.reference, info.num_shards)  # num_shards: max_nodes
        bound = getattr(self._plane, "bound_results", None)  # a plane that reads results from a server
        if bound is not None:
            bound(limits)
        if self.opts.prefetch is not None:  # a state download in flight since start-up: held to them from now on
            self.opts.prefetch.bound(limits)
        log.info("[node=%s] joined %s: shard %d/%d, first round %d, %d rounds committed", self.name,
                 self._plane.where, info.shard, info.num_shards, info.first_round, info.committed_rounds)
        return info

    def enter(self, info: JoinInfo) -> None:
        """Bring θ_ref to the run's (checkpoint, downloaded state, rounds missed) and, entering an overlapped run
        under way, step in at a round boundary. Raises ``Stopped``."""
        if self._sync_state(info.first_round):
            self._inflight = self._step_in()

    @property
    def next_round(self) -> int:
        """The round the next inner steps belong to."""
        return self._worker.reference.committed_rounds + (1 if self._inflight is not None else 0)

    @property
    def finished(self) -> bool:
        """The run's last round (or ``max_rounds`` applied rounds) is reached: train no more rounds."""
        extra = 1 if self._inflight is not None else 0
        assert self.cfg is not None
        return self.next_round >= self.cfg.rounds or (self.opts.max_rounds is not None and
                                                      self.applied + extra >= self.opts.max_rounds)

    def drain(self) -> RoundReport | None:
        """The run is finished: apply the round still in flight (overlap)."""
        report = None
        if self._inflight is not None:
            done, self._inflight = self._inflight, None
            report = self._finish(done)
        log.info("[node=%s] done after round %d", self.name, self._worker.reference.committed_rounds - 1)
        return report

    def before_round(self) -> bool:
        """Before a round's inner steps: True when the run had forgotten this node and it joined again (the state
        may have moved: check ``finished`` again)."""
        if not self._plane.lost.is_set():
            return False
        self._rejoin(Rejoin("lease lost"))
        return True

    def _rejoin(self, exc: Rejoin) -> None:
        log.warning("[node=%s] %s: joining again", self.name, exc)
        if self._inflight is not None:
            self._inflight.future.cancel()
        self._inflight = None
        # the frame in flight is kept: the run may have taken it before it forgot us — the round is then ours, applied
        # as any round we took part in (with overlap: keeping the progress made since, _apply_observed) — or the
        # round may still be open, and it gets the same frame again
        info = self.join()
        # no _step_in: after a coordinator restart all rejoin; no checkpoint restore: our state in memory is current
        self._sync_state(info.first_round, restore=False)

    def leave(self) -> None:
        """An orderly exit: the exit checkpoint (when a round was applied) and Leave."""
        if self.worker is not None and self.applied:
            self.files.checkpoint(self.worker, self.config_hash, wait=True)
        if self.plane is not None:
            self.plane.leave("shutdown" if self.stop.is_set() else "done")

    def shutdown(self) -> None:
        """Always, last: cancel the round in flight, stop the threads, close the plane (also after a refusal: a DHT
        plane owns a p2pd that must not outlive us)."""
        if self._inflight is not None:
            self._inflight.future.cancel()
            self._inflight = None
        self._drop_prefetch()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.files.close()
        if self.plane is not None:
            self.plane.close()

    # -- one round -----------------------------------------------------------------------------------
    def end_round(self, stats: InnerStats) -> RoundReport | None:
        """This node trained a round's inner steps: apply the round still in flight (overlap), offer this round's
        frame, and without overlap wait for the round and apply it. Returns the report of the round applied now
        (None when none was: the first overlapped round, or a round whose outcome was to take the run's state). A
        run that forgot this node is joined again here. Raises ``Stopped``."""
        worker = self._worker
        try:
            report = None
            if self._inflight is not None:
                done, self._inflight = self._inflight, None
                try:
                    report = self._finish(done)
                except Rejoin as exc:  # overlap: joined again, the round in flight settled, and this round's
                    self._rejoin(exc)  # frame is offered now, as it would have been (not a round later)
            r = worker.reference.committed_rounds  # a failed round is offered again, as without overlap
            retry = worker.pending is not None and worker.pending.round == r
            frame = worker.pending.frame if retry else worker.prepare(r)  # a round that did not commit: the same
            # frame again (the steps trained meanwhile go into the next round's, or are dropped)
            assert worker.pending is not None
            submission = Submission(r, frame, self.name, stats.mean_loss, worker.fingerprint())
            exchange = InFlight(r, stats, self.clock.now(), self._executor.submit(
                self._plane.exchange, submission, self.opts.round_timeout_s), worker.pending.reset)
            if worker.cfg.recipe.overlap:
                self._inflight = exchange
                return report
            return self._finish(exchange)
        except Rejoin as exc:
            self._rejoin(exc)
            return None

    def _finish(self, done: InFlight) -> RoundReport | None:
        """Wait for one round's exchange and apply its outcome (record, fingerprint check, checkpoint, state offer)."""
        worker = self._worker
        result = done.future.result()  # Rejoin / Stopped raised by the exchange surface here
        r, stats = done.round, done.stats
        if stats is None:
            if not self._apply_observed(r, result, overlapped=True):
                self._adopt_state("observed round not applicable")
            return None
        wait_s = self.clock.now() - done.started
        if result.state_needed:
            worker.pending = None
            log.warning("[node=%s round=%d] %s", self.name, r, result.reason or "the round's result is gone")
            self._adopt_state("diverged" if result.status is RoundStatus.DIVERGED else "round result gone")
            return None
        applied = worker.apply(result)
        status = (RoundStatus.COMMITTED.value if applied.committed
                  else "rejected" if result.committed else result.status.value)
        robust = robust_entry(self.name, worker.reference.last_report, r) if applied.committed else None
        report = RoundReport(r, status, applied.contributed, applied.members, stats.mean_loss, worker.fingerprint(),
                             result.bytes_sent, result.bytes_received, stats.compute_s, wait_s, stats.skipped,
                             applied.rejected, robust)
        if not applied.committed:
            self._record(report, result, done.reset, stats)
            # still serve our (unchanged) state: a run short of its quorum gets it back from the joiners
            self._plane.offer_state(worker.reference.committed_rounds, worker.fingerprint(), worker.reference.to_bytes)
            return report
        self.applied += 1
        self._record(report, result, done.reset, stats)
        fp = report.fingerprint
        if result.reference_fingerprint and fp != result.reference_fingerprint and worker.replica_consistent:
            log.warning("[node=%s round=%d] fingerprint %s ≠ coordinator's %s: fetching state", self.name, r, fp,
                        result.reference_fingerprint)
            self._adopt_state("fingerprint mismatch")
        elif self._plane.current_round > worker.reference.committed_rounds + 1:
            self._adopt_state("fell behind")
        if self.applied % self.opts.checkpoint_every == 0:
            self.files.checkpoint(worker, self.config_hash)
        self._plane.offer_state(worker.reference.committed_rounds, worker.fingerprint(), worker.reference.to_bytes)
        self._late_streak = 0 if report.contributed else self._late_streak + 1
        if self._late_streak >= 2 and not worker.cfg.recipe.overlap:
            # our frames keep missing the rounds (most often they arrive after the round closed: we started a round
            # late and stay late by that margin): sit the next round out, so the one after starts when everyone
            # else's does. Our own frames are always valid (prepare never sends a non-finite value), so a refusal is
            # not among the usual causes; the plane's log says which it was.
            log.info("[node=%s round=%d] our frame was not in %d rounds in a row (late or lost on the way): skipping "
                     "a round to get back in step", self.name, r, self._late_streak)
            self._late_streak = 0
            self._catch_up(skip_open_round=True)
        return report

    def _record(self, report: RoundReport, result: RoundResult, reset: str, stats: InnerStats) -> None:
        """The one place a round's record is produced: the log line, the ``rounds.jsonl`` line of a committed round,
        and every listener (metrics hook here)."""
        if not report.committed:
            log.warning("[node=%s round=%d] not committed: %s", self.name, report.round, result.reason)
        else:
            self.files.log_round(committed_line(self.name, report, result, reset, stats,
                                                self._worker.reference.dense_bytes()))
        for listener in self.listeners:
            listener(report)

    # -- state sync ----------------------------------------------------------------------------------
    def _sync_state(self, first_round: int, restore: bool = True) -> bool:
        """Bring θ_ref to the run's state before contributing to ``first_round``; True when that took the run's
        state (this node enters a run under way). ``restore``: start from the workdir's checkpoint (a daemon
        starting); False for a live node joining again, whose state in memory is newer than any checkpoint."""
        worker = self._worker
        if not restore and worker.reference.committed_rounds <= first_round:
            if worker.reference.committed_rounds < first_round:
                self._catch_up(until=first_round)
            return False
        if restore and self.files.restore(worker, self.config_hash):
            self.resumed = True
            c = worker.reference.committed_rounds
            # rounds from c on that the log holds (written before a kill, the checkpoint not yet) are applied again
            self.files.log_round({"event": "resumed", "committed_rounds": c, "fingerprint": worker.fingerprint()})
            # where peers serve the state (serverless): from the start, so that after every node restarted, one
            # whose checkpoint is a round behind can fetch it from the others instead of waiting for them forever
            self._plane.offer_state(c, worker.fingerprint(), worker.reference.to_bytes)
            if c == first_round:
                log.info("[node=%s] resumed from checkpoint at round %d", self.name, first_round)
                self._drop_prefetch()
                return False
            if c < first_round and getattr(self._plane, "serves_past_results", False):
                # a checkpoint a few rounds behind: apply those rounds from their results rather than download the
                # whole state (a result no longer held makes _catch_up fetch the state after all)
                log.info("[node=%s] resumed from checkpoint after %d rounds: catching up on %d round(s) from their "
                         "results", self.name, c, first_round - c)
                self._drop_prefetch()
                self._catch_up(until=first_round)
                return True
        if first_round == 0:
            self._drop_prefetch()
            return False  # the run has not started: everyone starts from the same seeded init
        # The newest state at once (no waiting for the open round), then the rounds that closed meanwhile and
        # the one open now: on a slow link the download can take longer than a round.
        self._adopt_state("join")
        self._catch_up(until=first_round)
        return True

    def _catch_up(self, skip_open_round: bool = False, until: int = 0) -> None:
        """Apply, without contributing, the rounds that closed since our state (a download on a slow link can take
        longer than a round) — and with ``skip_open_round`` also the round open now, so that the next round this
        node trains starts when everyone else's does (a node that is late by a margin stays late by it). ``until``:
        apply at least every round before this one (the first round the control plane expects us in)."""
        worker = self._worker
        while not self.stop.is_set():
            c = worker.reference.committed_rounds
            behind = c < until or self._plane.current_round > c  # ``until``: the first round the run expects us in
            if c >= worker.cfg.rounds or (not behind and not skip_open_round):
                return
            skip_open_round = False
            if not self._apply_observed(c, self._plane.observe(c, self.opts.round_timeout_s, worker.fingerprint())):
                return

    def _apply_observed(self, c: int, result: RoundResult, overlapped: bool = False) -> bool:
        """Apply round ``c``, which this node observed without contributing; False when it could not (logged).
        ``overlapped``: the node trained the next round meanwhile (see ``_step_in``) and keeps that progress."""
        worker = self._worker
        if result.state_needed:
            self._adopt_state("catching up: round result gone")
            return True
        pending = worker.pending
        if not overlapped and pending is not None and pending.round == c:
            # we offered a frame for this round and lost the reply (a rejoin, a round sat out): the round is one we
            # took part in or missed, as if the reply had come — error feedback commits what was sent or keeps it
            applied = worker.apply(result)
            ok, contributed = applied.committed, applied.contributed
        else:
            ok, contributed = worker.apply_observed(result, keep_local_progress=overlapped), False
        if not ok:
            log.warning("[node=%s round=%d] could not apply the round while catching up (%s)", self.name, c,
                        result.reason or "not committed")
            return False
        fp = worker.fingerprint()
        self.files.log_round(observed_line(self.name, c, result, fp, overlapped,
                                           robust_entry(self.name, worker.reference.last_report, c), contributed))
        if result.reference_fingerprint and fp != result.reference_fingerprint and worker.replica_consistent:
            self._adopt_state("fingerprint mismatch")
        return True

    def _step_in(self) -> InFlight | None:
        """With overlapped rounds, a node that enters a run under way starts its inner steps when the others start
        theirs. They train round c+1 from the moment they send round c's frame, so a node that trained round c
        from whenever its download ended would be late by up to a round, in that round and (overlap never waits)
        every round after. Instead it waits for round c's first frames, then trains round c+1 with round c
        observed in flight, applied at the round boundary like any overlapped round (``keep_local_progress``).
        The wait is at most a round (``STEP_IN_MAX_S``); planes that cannot tell (``round_started`` None) skip it."""
        worker = self._worker
        if not worker.cfg.recipe.overlap:
            return None
        give_up = self.clock.now() + STEP_IN_MAX_S
        while not self.stop.is_set() and self.clock.now() < give_up:
            c = worker.reference.committed_rounds
            if c >= worker.cfg.rounds:
                return None
            started = self._plane.round_started(c)
            if started is None:
                return None
            if started:  # the others are training c+1 already: take round c, then wait for c+1 to start
                if not self._apply_observed(c, self._plane.observe(c, self.opts.round_timeout_s,
                                                                   worker.fingerprint())):
                    return None
                continue
            while not self.clock.sleep(0.2, self.stop) and self.clock.now() < give_up:
                if self._plane.round_started(c):
                    log.info("[node=%s round=%d] the others sent round %d: training round %d from now", self.name,
                             c, c, c + 1)
                    return InFlight(c, None, self.clock.now(), self._executor.submit(
                        self._plane.observe, c, self.opts.round_timeout_s, worker.fingerprint()))
        return None

    def _drop_prefetch(self) -> None:
        if self.opts.prefetch is not None:
            self.opts.prefetch.cancel()
            self.opts.prefetch = None

    def _adopt_state(self, why: str, after_round: int | None = None) -> None:
        worker = self._worker
        ours = worker.reference.committed_rounds
        started = self.clock.now()
        prefetch, self.opts.prefetch = self.opts.prefetch, None
        state = prefetch.take(self.stop) if prefetch is not None and after_round is None else None
        if state is not None and state.committed < worker.reference.committed_rounds:
            state = None  # downloaded while starting up, older than the checkpoint this node resumed from
        if state is not None:
            assert prefetch is not None
            started, why = self.clock.now() - prefetch.download_s, f"{why}, downloaded while starting up"
        else:
            if prefetch is not None:
                prefetch.cancel()
            # never back to an older state than ours (the coordinator's newest snapshot may be a few rounds old)
            state = self._plane.fetch_state(after_round, self.opts.round_timeout_s, at_least=ours)
        if state is None:
            raise RuntimeError(f"the global state is needed ({why}) but {self._plane.where} cannot serve it")
        committed, blob, fingerprint = state.committed, state.blob, state.fingerprint
        download_s = self.clock.now() - started
        worker.adopt_global_state(blob)
        worker.pending = None  # a frame made on the state we had is not offered on this one (or for its round)
        if worker.fingerprint() != fingerprint:
            raise RuntimeError(f"fetched state fingerprint {worker.fingerprint()} ≠ published {fingerprint}")
        if committed < ours:  # an older snapshot (the coordinator forces newer ones only so often): not back in time
            committed, fingerprint = replay_to(self.name, self._plane, self._worker, self.stop,
                                                 self.opts.round_timeout_s, ours, committed, fingerprint)
        log.info("[node=%s] adopted state after %d rounds (%d bytes, %.2f s, %s)", self.name, committed, len(blob),
                 self.clock.now() - started, why)
        self.files.log_round({"event": "state", "committed_rounds": committed, "fingerprint": fingerprint,
                              "why": why, "bytes": len(blob), "download_s": round(download_s, 3)})
