"""``lowband node``: the long-running worker. Join, (fetch state), train H steps, submit, collect,
apply, checkpoint, repeat — until the run's last round, SIGTERM, or Ctrl-C.

The run is driven through a ``ControlPlane`` (node/transport/control.py): a gRPC coordinator by default, with
``NodeOptions.dht`` a serverless hivemind DHT, or any plane handed to the constructor (an in-process run in tests,
wrapped in the fault seam). The only mode switch is where the plane is built. Waits are decided on an injected
``Clock`` (node/clock.py).

Files in the workdir: ``node.key`` (the node's ed25519 identity, node/identity.py: it signs every frame),
``checkpoint.safetensors`` (write-then-rename every ``checkpoint_every`` applied rounds and on exit; the state format of
docs/state.md, node/train/checkpoint.py) and ``rounds.jsonl`` (one line per applied round or adopted state: the
exactly-once audit trail; with a recipe's ``reduce`` on, each round's accountability report under ``"robust"``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from node.clock import SYSTEM_CLOCK, Clock
from node.fsutil import write_atomic
from node.config import RunConfig, diff_configs
from node.identity import NodeKey
from node.tasks import load_task
from node.tasks.base import build_seeded
from node.train import checkpoint, state_file
from node.train.inner import InnerStats
from node.train.tensors import digest_of
from node.roundlog import append_line
from node.train.worker import Worker
from node.transport.control import ControlPlane, Identity, JoinRefused, Rejoin, Stopped
from node.transport.messages import RoundResult, RoundStatus, Submission

if TYPE_CHECKING:
    from node.transport.dht_control import DhtSettings
    from node.transport.grpc_auth import ClientTls
    from node.transport.state_prefetch import StatePrefetch

log = logging.getLogger(__name__)


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


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


STEP_IN_MAX_S = 120.0  # the longest a node entering an overlapped run waits for the others' next round to start


@dataclass
class InFlight:
    """A round whose frame is out: its exchange runs on the daemon's exchange thread."""

    round: int
    stats: InnerStats | None  # None: a round only observed, while this node trains the next one (see _step_in)
    started: float
    future: Future[RoundResult]
    reset: str = ""  # the frame was sent after a reset of a poisoned local state (why), see Worker.prepare


class NodeDaemon:
    """``plane``: the control plane to use instead of building one from ``opts`` (tests: an in-process run, the fault
    seam); the daemon closes it when it ends. ``clock``: what the daemon's waits are decided on."""

    def __init__(self, opts: NodeOptions, stop: threading.Event | None = None, *, plane: ControlPlane | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.opts = opts
        self.stop = stop or threading.Event()
        self.clock = clock
        self._given_plane = plane
        self.name = opts.name or f"{socket.gethostname()}-{os.getpid()}"
        self.workdir = Path(opts.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.key = NodeKey.load_or_create(self.workdir)  # a restart with the same workdir is the same node
        self.plane: ControlPlane | None = None  # built in run(): starting a DHT can fail, and must be closed
        self.worker: Worker | None = None
        self.applied = 0
        self._late_streak = 0  # consecutive committed rounds without our payload
        # one exchange at a time, off the training thread (with overlap it runs while the next round trains)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exchange")
        self._ckpt_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._ckpt_write: Future[None] | None = None

    # -- files ---------------------------------------------------------------------------------------
    def _log_round(self, entry: dict[str, Any]) -> None:
        entry = {**entry, "time": time.time()}
        append_line(self.workdir / "rounds.jsonl", entry)
        if self.opts.on_record is not None:  # the one hook where a round's record is produced
            self.opts.on_record(entry)

    def _checkpoint(self, config_hash: str, wait: bool = False) -> None:
        """Snapshot the worker now (tensor copies, so training can go on) and write it on the checkpoint thread:
        serialising and fsyncing a large model's state every round would otherwise stall training for seconds.
        One write at a time; write-then-rename keeps the file whole whenever the process dies."""
        assert self.worker is not None
        if self._ckpt_write is not None:
            self._ckpt_write.result()  # the previous round's write is done before the next starts
        header, tensors = checkpoint.snapshot(self.worker, node=self.name, config_hash=config_hash)

        def write() -> None:
            write_atomic(self.workdir / checkpoint.FILE, state_file.dumps(tensors, header))

        self._ckpt_write = self._ckpt_executor.submit(write)
        if wait:
            self._ckpt_write.result()

    def _restore_checkpoint(self, config_hash: str) -> bool:
        """Restore the worker from the workdir's checkpoint; False (logged) when there is none, it is of another run,
        or it is not a lowband checkpoint this model can take — the worker is then unchanged."""
        worker = self.worker
        assert worker is not None
        if (self.workdir / checkpoint.OLD_FILE).exists():
            log.warning("[node=%s] %s is a PyTorch pickle from an older lowband: it is never loaded (delete it); "
                        "checkpoints are %s now", self.name, self.workdir / checkpoint.OLD_FILE, checkpoint.FILE)
        path = self.workdir / checkpoint.FILE
        if not path.exists():
            return False
        try:
            sf = state_file.parse(path.read_bytes(), worker.reference.max_header() * 3)
            # a checkpoint written before protocol 3 names the same run by its older hash
            legacy = worker.cfg.legacy_config_hash(worker.task.fingerprint)
            if sf.header.get("config_hash") not in (config_hash, legacy):
                log.info("checkpoint is from another run (config hash %s ≠ %s): not used", sf.header.get("config_hash"),
                         config_hash)
                return False
            checkpoint.restore(worker, sf)
        except (OSError, ValueError) as exc:  # StateFormatError is a ValueError
            log.warning("[node=%s] checkpoint %s refused: %s", self.name, path, exc)
            return False
        return True

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

        # the node's identity: the key in its workdir (a restart with the same workdir is the same node)
        return GrpcControl(self.opts.coordinator, self.stop, key=self.key,
                           tls=self.opts.tls, token=self.opts.join_token)

    @property
    def _plane(self) -> ControlPlane:
        assert self.plane is not None
        return self.plane

    def _join(self) -> tuple[RunConfig, str, int]:
        cfg = self._plane.get_run_config()
        if self.opts.run is not None:
            diffs = diff_configs(self.opts.run.to_dict(), cfg.to_dict())
            if diffs:
                log.warning("this node's run file differs from the coordinator's; Join will be refused")
            cfg_for_join = self.opts.run
        else:
            cfg_for_join = cfg
        task = load_task(cfg_for_join.task.name, **cfg_for_join.task.params)
        digest = digest_of(build_seeded(task, cfg_for_join.seed))
        config_hash = cfg_for_join.config_hash(task.fingerprint)
        identity = Identity(self.name, json.dumps(cfg_for_join.to_dict()), config_hash, task.fingerprint, digest,
                            (f"device={_device(self.opts.device)}",), self.opts.join_token, self.key.public)
        info = self._plane.join(identity)
        if self.worker is None:
            self.worker = Worker(self.name, cfg, task, shard=info.shard, num_shards=info.num_shards,
                                 device=_device(self.opts.device), key=self.key)
        log.info("[node=%s] joined %s: shard %d/%d, first round %d, %d rounds committed", self.name,
                 self._plane.where, info.shard, info.num_shards, info.first_round, info.committed_rounds)
        return cfg, config_hash, info.first_round

    def _sync_state(self, first_round: int, config_hash: str) -> bool:
        """Bring θ_ref to the run's state before contributing to ``first_round``; True when that took the run's
        state (this node enters a run under way)."""
        worker = self.worker
        assert worker is not None
        if self._restore_checkpoint(config_hash):
            # where peers serve the state (serverless): from the start, so that after every node restarted, one
            # whose checkpoint is a round behind can fetch it from the others instead of waiting for them forever
            self._plane.offer_state(worker.reference.committed_rounds, worker.fingerprint(), worker.reference.to_bytes)
            if worker.reference.committed_rounds == first_round:
                log.info("[node=%s] resumed from checkpoint at round %d", self.name, first_round)
                self._drop_prefetch()
                return False
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
        worker = self.worker
        assert worker is not None
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
        worker = self.worker
        assert worker is not None
        if result.state_needed:
            self._adopt_state("catching up: round result gone")
            return True
        if not worker.apply_observed(result, keep_local_progress=overlapped):
            log.warning("[node=%s round=%d] could not apply the round while catching up (%s)", self.name, c,
                        result.reason or "not committed")
            return False
        fp = worker.fingerprint()
        self._log_round({"round": c, "members": list(result.members),
                         "contributed": False, "fingerprint": fp,
                         "coordinator_fingerprint": result.reference_fingerprint, "observed": True,
                         **({"overlapped": True} if overlapped else {}), **self._robust_entry(c)})
        log.info("[node=%s round=%d] applied without contributing (%s) fp=%s", self.name, c,
                 "observed while training the next round" if overlapped else "catching up", fp)
        if result.reference_fingerprint and fp != result.reference_fingerprint and worker.replica_consistent:
            self._adopt_state("fingerprint mismatch")
        return True

    def _robust_entry(self, round_: int) -> dict[str, Any]:
        """The round's accountability report for rounds.jsonl (``{"robust": ...}``; empty with ``reduce`` off), and a
        log line for every member whose frame the bounds rejected or that the round evicted."""
        worker = self.worker
        assert worker is not None
        report = worker.reference.last_report
        if report is None or report.round != round_:
            return {}
        for name, m in sorted(report.members.items()):
            if m.rejected and not m.rejected.startswith("evicted"):
                log.warning("[node=%s round=%d] dropped %s's frame: %s", self.name, round_, name, m.rejected)
        for name, reason in sorted(report.evicted.items()):
            log.warning("[node=%s round=%d] member %s evicted (its frames are dropped from now on): %s", self.name,
                        round_, name, reason)
        return {"robust": report.to_json()}

    def _step_in(self) -> InFlight | None:
        """With overlapped rounds, a node that enters a run under way starts its inner steps when the others start
        theirs. They train round c+1 from the moment they send round c's frame, so a node that trained round c
        from whenever its download ended would be late by up to a round, in that round and (overlap never waits)
        every round after. Instead it waits for round c's first frames, then trains round c+1 with round c
        observed in flight, applied at the round boundary like any overlapped round (``keep_local_progress``).
        The wait is at most a round (``STEP_IN_MAX_S``); planes that cannot tell (``round_started`` None) skip it."""
        worker = self.worker
        assert worker is not None
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
        worker = self.worker
        assert worker is not None
        started = self.clock.now()
        prefetch, self.opts.prefetch = self.opts.prefetch, None
        state = prefetch.take(self.stop) if prefetch is not None and after_round is None else None
        if state is not None:
            assert prefetch is not None
            started, why = self.clock.now() - prefetch.download_s, f"{why}, downloaded while starting up"
        else:
            if prefetch is not None:
                prefetch.cancel()
            state = self._plane.fetch_state(after_round, self.opts.round_timeout_s)
        if state is None:
            raise RuntimeError(f"the global state is needed ({why}) but {self._plane.where} cannot serve it")
        committed, blob, fingerprint = state.committed, state.blob, state.fingerprint
        download_s = self.clock.now() - started
        worker.adopt_global_state(blob)
        if worker.fingerprint() != fingerprint:
            raise RuntimeError(f"fetched state fingerprint {worker.fingerprint()} ≠ published {fingerprint}")
        log.info("[node=%s] adopted state after %d rounds (%d bytes, %.2f s, %s)", self.name, committed, len(blob),
                 self.clock.now() - started, why)
        self._log_round({"event": "state", "committed_rounds": committed, "fingerprint": fingerprint, "why": why,
                         "bytes": len(blob), "download_s": round(download_s, 3)})

    def run(self) -> int:
        """Exit status: 0 when the run ended or the node was stopped, 3 when the run refused it. An unexpected error
        propagates without a checkpoint (the state may be half-updated: the last checkpoint stays) or a Leave."""
        try:
            self.plane = self._make_plane()
            try:
                cfg, config_hash, first = self._join()
            except JoinRefused as exc:
                log.error("[node=%s] join refused: %s", self.name, exc)
                return 3
            except Stopped:
                return 0
            try:
                entered = self._sync_state(first, config_hash)
                code = self._loop(cfg, config_hash, self._step_in() if entered else None)
            except Stopped:
                code = 0
            if self.worker is not None and self.applied:
                self._checkpoint(config_hash, wait=True)
            self.plane.leave("shutdown" if self.stop.is_set() else "done")
            return code
        finally:
            self._drop_prefetch()
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._ckpt_executor.shutdown(wait=True)
            if self.plane is not None:
                self.plane.close()  # also on refusal: a DHT plane owns a p2pd that must not outlive us

    def _loop(self, cfg: RunConfig, config_hash: str, inflight: InFlight | None = None) -> int:
        """Rounds until the run's end. With ``recipe.overlap`` the exchange of round r runs on a background thread
        while round r+1 trains; round r is applied after those inner steps (see node/train/worker.py)."""
        worker = self.worker
        assert worker is not None
        try:
            while not self.stop.is_set():
                r = worker.reference.committed_rounds + (1 if inflight is not None else 0)
                if r >= cfg.rounds or (self.opts.max_rounds is not None and
                                       self.applied + (1 if inflight else 0) >= self.opts.max_rounds):
                    if inflight is not None:
                        self._finish(inflight, config_hash)
                        inflight = None
                    log.info("[node=%s] done after round %d", self.name, worker.reference.committed_rounds - 1)
                    return 0
                try:
                    if self._plane.lost.is_set():
                        raise Rejoin("lease lost")
                    stats = worker.train()
                    if self.stop.is_set():
                        break
                    if inflight is not None:
                        done, inflight = inflight, None
                        self._finish(done, config_hash)
                        r = worker.reference.committed_rounds  # a failed round is offered again, as without overlap
                    retry = worker.pending is not None and worker.pending.round == r
                    frame = worker.pending.frame if retry else worker.prepare(r)  # a round that did not commit:
                    # the same frame again (the steps trained meanwhile go into the next round's, or are dropped)
                    assert worker.pending is not None
                    submission = Submission(r, frame, self.name, stats.mean_loss, worker.fingerprint())
                    exchange = InFlight(r, stats, self.clock.now(), self._executor.submit(
                        self._plane.exchange, submission, self.opts.round_timeout_s), worker.pending.reset)
                    if cfg.recipe.overlap:
                        inflight = exchange
                    else:
                        self._finish(exchange, config_hash)
                except Rejoin as exc:
                    log.warning("[node=%s] %s: joining again", self.name, exc)
                    inflight = None
                    worker.pending = None
                    try:
                        _, _, first = self._join()
                    except JoinRefused as refused:  # e.g. the run evicted this node
                        log.error("[node=%s] join refused: %s", self.name, refused)
                        return 3
                    self._sync_state(first, config_hash)  # no _step_in: after a coordinator restart all rejoin
        finally:
            if inflight is not None:
                inflight.future.cancel()
        return 0

    def _finish(self, done: InFlight, config_hash: str) -> None:
        """Wait for one round's exchange and apply its outcome (log, fingerprint check, checkpoint, state offer)."""
        worker = self.worker
        assert worker is not None
        result = done.future.result()  # Rejoin / Stopped raised by the exchange surface here
        r, stats = done.round, done.stats
        if stats is None:
            if not self._apply_observed(r, result, overlapped=True):
                self._adopt_state("observed round not applicable")
            return
        wait_s = self.clock.now() - done.started
        if result.state_needed:
            worker.pending = None
            log.warning("[node=%s round=%d] %s", self.name, r, result.reason or "the round's result is gone")
            self._adopt_state("diverged" if result.status is RoundStatus.DIVERGED else "round result gone")
            return
        report = worker.apply(result)
        if not report.committed:
            log.warning("[node=%s round=%d] not committed: %s", self.name, r, result.reason)
            # still serve our (unchanged) state: a run short of its quorum gets it back from the joiners
            self._plane.offer_state(worker.reference.committed_rounds, worker.fingerprint(), worker.reference.to_bytes)
            return
        self.applied += 1
        fp = worker.fingerprint()
        health = {"skipped_steps": stats.skipped} if stats.skipped else {}
        if done.reset:
            health["reset"] = done.reset
        if stats.skipped:
            log.warning("[node=%s round=%d] skipped %d of %d inner steps with a non-finite loss or gradient (first: %s)",
                        self.name, r, stats.skipped, stats.steps, stats.skip_cause)
        self._log_round({"round": r, "members": list(report.members), "contributed": report.contributed,
                         "fingerprint": fp, "coordinator_fingerprint": result.reference_fingerprint,
                         "loss": stats.mean_loss, "bytes_out": result.bytes_sent, "bytes_in": result.bytes_received,
                         "train_s": round(stats.compute_s, 3), "wait_s": round(wait_s, 3), "rejected": report.rejected,
                         "steps": stats.steps, "dense_bytes": 4 * sum(math.prod(t.shape) for t in worker.reference.spec),
                         **health, **self._robust_entry(r)})
        log.info("[node=%s round=%d] loss=%.4f members=%d contributed=%s out=%dB in=%dB train=%.2fs exchange=%.2fs "
                 "fp=%s", self.name, r, stats.mean_loss, len(report.members), report.contributed, result.bytes_sent,
                 result.bytes_received, stats.compute_s, wait_s, fp)
        if result.reference_fingerprint and fp != result.reference_fingerprint and worker.replica_consistent:
            log.warning("[node=%s round=%d] fingerprint %s ≠ coordinator's %s: fetching state", self.name, r, fp,
                        result.reference_fingerprint)
            self._adopt_state("fingerprint mismatch")
        elif self._plane.current_round > worker.reference.committed_rounds + 1:
            self._adopt_state("fell behind")
        if self.applied % self.opts.checkpoint_every == 0:
            self._checkpoint(config_hash)
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


def run_node(opts: NodeOptions) -> int:
    import signal

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if not stop.is_set():  # one line, at once: finishing the round's inner steps can take a while
            log.warning("%s: finishing this round's inner steps, then checkpoint, leave and exit 0",
                        signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    return NodeDaemon(opts, stop).run()
