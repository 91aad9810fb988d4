"""``lowband node``: the long-running worker that trains through the ``Task`` seam. Join, (fetch state), train H
steps, submit, collect, apply, checkpoint, repeat — until the run's last round, SIGTERM, or Ctrl-C.

Everything around the inner steps is the round engine's (node/engine.py), which the Python API's ``Session``
(node/api.py) drives as well; this module only builds the task's model and runs the inner steps (``Worker.train``).

Multi-process nodes (``torchrun --nproc-per-node N -m node.cli node ...``, node/train/local_group.py): the N processes
train one data-parallel replica (DDP). Local rank 0 drives the engine — it alone talks to the run, writes the
workdir's files and sends the node's frame — and at every round boundary broadcasts the node's local state to the
others, which only train.

Files in the workdir (node/workdir.py): ``node.key`` (the node's ed25519 identity, node/identity.py: it signs its calls
and every frame), ``checkpoint.safetensors`` (write-then-rename every ``checkpoint_every`` applied rounds and on exit;
docs/state.md) and ``rounds.jsonl`` (one line per applied round, adopted state or resumed checkpoint: the exactly-once
audit trail; with a recipe's ``reduce`` on, each round's accountability report under ``"robust"``).
"""
from __future__ import annotations

import logging
import threading

from node.clock import SYSTEM_CLOCK, Clock
from node.config import RunConfig
from node.identity import NodeKey
from node.engine import STEP_IN_MAX_S, NodeOptions, RoundEngine, device_of
from node.tasks import load_task
from node.tasks.base import Task, build_seeded
from node.train.local_group import LocalGroup
from node.train.tensors import digest_of
from node.train.worker import Worker
from node.transport.control import ControlPlane, JoinInfo, JoinRefused, Stopped

__all__ = ["NodeDaemon", "NodeOptions", "STEP_IN_MAX_S", "run_node"]

log = logging.getLogger(__name__)


class TaskSource:
    """The daemon's worker: the task's model, built from the run's seed, trained by ``Worker.train``."""

    def __init__(self, name: str, device: str, group: LocalGroup | None) -> None:
        self.name, self.device, self.group = name, device, group
        self._described: tuple[str, Task, str] | None = None

    def describe(self, cfg: RunConfig) -> tuple[Task, str]:
        key = cfg.config_hash()
        if self._described is None or self._described[0] != key:  # a rejoin does not build the model again
            task = load_task(cfg.task.name, **cfg.task.params)
            self._described = key, task, digest_of(build_seeded(task, cfg.seed))
        return self._described[1], self._described[2]

    def build(self, cfg: RunConfig, task: Task, info: JoinInfo, key: NodeKey) -> Worker:
        return Worker(self.name, cfg, task, shard=info.shard, num_shards=info.num_shards,
                      device=self.group.device if self.group else device_of(self.device), key=key, local=self.group)


class NodeDaemon:
    """``plane``: the control plane to use instead of building one from ``opts`` (tests: an in-process run, the fault
    seam); the daemon closes it when it ends. ``clock``: what the daemon's waits are decided on. ``group``: the
    node's local processes when it is one of several (rank 0 only builds a daemon; see ``run_node``)."""

    def __init__(self, opts: NodeOptions, stop: threading.Event | None = None, *, plane: ControlPlane | None = None,
                 clock: Clock = SYSTEM_CLOCK, group: LocalGroup | None = None) -> None:
        self.opts = opts
        self.stop = stop or threading.Event()
        self.group = group
        self.engine = RoundEngine(opts, self.stop, TaskSource(opts.name, opts.device, group), plane=plane, clock=clock)
        self.name = self.engine.name

    @property
    def worker(self) -> Worker | None:
        return self.engine.worker

    @property
    def plane(self) -> ControlPlane | None:
        return self.engine.plane

    @property
    def applied(self) -> int:
        return self.engine.applied

    def run(self) -> int:
        """Exit status: 0 when the run ended or the node was stopped, 3 when the run refused it. An unexpected error
        propagates without a checkpoint (the state may be half-updated: the last checkpoint stays) or a Leave."""
        engine = self.engine
        clean = False  # after an error the other local processes may be inside a collective: torchrun ends them
        try:
            try:
                info = engine.join()
            except JoinRefused as exc:
                log.error("[node=%s] join refused: %s", self.name, exc)
                clean = True
                return 3
            except Stopped:
                clean = True
                return 0
            if self.group is not None:
                assert engine.cfg is not None and engine.worker is not None
                self.group.send_start(engine.cfg, engine.worker)
            code = 0
            try:
                engine.enter(info)
                self._loop()
            except Stopped:
                pass
            except JoinRefused as exc:  # joining again was refused (e.g. the run evicted this node)
                log.error("[node=%s] join refused: %s", self.name, exc)
                code = 3
            engine.leave()
            clean = True
            return code
        finally:
            if self.group is not None and self.group.open and clean:
                self.group.send_stop(engine.worker)  # the other local processes end with us, holding our state
            engine.shutdown()

    def _loop(self) -> None:
        """Rounds until the run's end. With ``recipe.overlap`` the exchange of round r runs on a background thread
        while round r+1 trains; round r is applied after those inner steps (see node/train/worker.py)."""
        engine, worker = self.engine, self.engine.worker
        assert worker is not None
        while not self.stop.is_set():
            if engine.finished:
                engine.drain()
                return
            if engine.before_round():
                continue  # joined again: the state may have moved
            if self.group is not None:  # the others train this round from exactly our local state
                self.group.send_round(worker, round=engine.next_round)
            stats = worker.train()
            if self.group is not None:
                self.group.trained(worker, engine.next_round)
            if self.stop.is_set():
                return
            engine.end_round(stats)


def run_node(opts: NodeOptions) -> int:
    """``lowband node``: SIGTERM and Ctrl-C stop the node (leave, checkpoint, exit 0). Under ``torchrun`` (more than
    one local process) rank 0 runs the daemon and the others follow it (node/train/local_group.py)."""
    import signal

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if not stop.is_set():  # one line, at once: finishing the round's inner steps can take a while
            log.warning("%s: finishing this round's inner steps, then checkpoint, leave and exit 0",
                        signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    group = LocalGroup.from_env(device_of(opts.device), opts.round_timeout_s)
    if group is None:
        return NodeDaemon(opts, stop).run()
    try:
        if group.leader:
            return NodeDaemon(opts, stop, group=group).run()
        return group.follow(lambda cfg, shard, num_shards: Worker(
            opts.name or "follower", cfg, load_task(cfg.task.name, **cfg.task.params), shard=shard,
            num_shards=num_shards, device=group.device, local=group))
    finally:
        group.close()
