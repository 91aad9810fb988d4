"""lowband's Python API: bring your own training loop (docs/api.md).

    import lowband
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    with lowband.join(model, optimizer, run="run.toml", coordinator="host:7070", workdir="./node0") as session:
        while not session.done:
            loss = compute_loss(model, next(batches)); loss.backward()
            optimizer.step(); optimizer.zero_grad()
            report = session.step(loss.item())   # every H steps: exchange, outer step, checkpoint → the round's report

Underneath is the node's round engine (node/engine.py) — the same control planes, codecs, outer optimizers, overlap,
joins with state download, checkpoints, signed identity and non-finite handling as ``lowband node``, which is the
other driver of the same engine (node/daemon.py, the ``Task`` seam). What this module adds is the user's side: the
user's model checked against the run's and given the run's weights, the user's optimizer and LR scheduler in the
node's checkpoint (node/train/external.py), and ``Session.step``.
"""
from __future__ import annotations

import hashlib
import re
import socket
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from node.cli_checks import CoordinatorUnreachable
from node.clock import SYSTEM_CLOCK, Clock
from node.config import RunConfig
from node.engine import NodeOptions, RoundEngine
from node.errors import ConfigError
from node.identity import NodeKey
from node.model_check import ModelMismatch, check_model, copy_model
from node.round_report import RoundReport
from node.runfile import RunFile, load_run_file
from node.tasks import load_task
from node.tasks.base import Task, build_seeded
from node.train.external import ExternalInner, Scheduler
from node.train.local_group import LocalGroup
from node.train.tensors import digest_of
from node.train.worker import Worker
from node.transport.control import ControlPlane, JoinInfo, JoinRefused, Stopped

__all__ = ["ConfigError", "CoordinatorUnreachable", "JoinRefused", "ModelMismatch", "RoundReport", "Session", "join"]


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


class _UserModel:
    """The engine's worker source for a user's model: checked against the run's task model, given its initial values
    once, trained by the user's optimizer."""

    def __init__(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Scheduler | None) -> None:
        self.name, self.model, self.optimizer, self.scheduler = name, model, optimizer, scheduler
        self._described: tuple[str, Task, str] | None = None
        self._initial: nn.Module | None = None

    def describe(self, cfg: RunConfig) -> tuple[Task, str]:
        key = cfg.config_hash()
        if self._described is None or self._described[0] != key:
            if cfg.recipe.inner.optimizer == "grad":
                raise ConfigError(f"recipe {cfg.recipe.name!r} sends a gradient every step (inner.optimizer = 'grad'): "
                                  "lowband must take that step itself; run it with `lowband node` (the Task seam)")
            task = load_task(cfg.task.name, **cfg.task.params)
            reference = build_seeded(task, cfg.seed)
            check_model(self.model, reference, cfg.task.name)  # raises ModelMismatch listing the differences
            self._described = key, task, digest_of(self.model)
            self._initial = reference if self._initial is None else self._initial
        return self._described[1], self._described[2]

    def build(self, cfg: RunConfig, task: Task, info: JoinInfo, key: NodeKey | None) -> Worker:
        if self._initial is not None:  # every replica starts from the run's seeded build (or its state, loaded next)
            copy_model(self._initial, self.model)
            self._initial = None
        return Worker(self.name, cfg, task, shard=info.shard, num_shards=info.num_shards, key=key, model=self.model,
                      inner=lambda model, named, buffers: ExternalInner(model, named, self.optimizer, self.scheduler))


def _default_name(workdir: Path) -> str:
    """``HOST-WORKDIR``, valid as a node name: the same workdir restarted is the same node."""
    text = re.sub(r"[^A-Za-z0-9._-]", "-", f"{socket.gethostname()}-{workdir.resolve().name}").strip("-._")
    if not text or len(text) > 64:
        text = "node-" + hashlib.sha256(str(workdir.resolve()).encode()).hexdigest()[:12]
    return text


class Session:
    """A node of a run whose inner steps are the user's. Made by ``join``; call ``step()`` after each inner optimizer
    step and ``close()`` at the end (or use it as a context manager)."""

    def __init__(self, engine: RoundEngine | None, source: _UserModel, stop: threading.Event,
                 group: LocalGroup | None) -> None:
        self._engine, self._source, self._stop, self._group = engine, source, stop, group
        self._worker: Worker | None = engine.worker if engine is not None else None
        self._done = False
        self._closed = False
        self._in_step = False
        self._skip = ""
        self.last_report: RoundReport | None = None

    # -- what the user's loop reads ------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """True once the run's last round (or ``max_rounds``) is applied: stop the loop and ``close()``."""
        return self._done

    @property
    def worker(self) -> Worker:
        assert self._worker is not None
        return self._worker

    @property
    def H(self) -> int:
        """Inner steps per round (the run's ``recipe.H``)."""
        return self.worker.cfg.recipe.H

    @property
    def config(self) -> RunConfig:
        return self.worker.cfg

    @property
    def round(self) -> int:
        """The round the current inner steps belong to."""
        return self._engine.next_round if self._engine is not None else self.worker.reference.committed_rounds

    @property
    def inner_step(self) -> int:
        """Inner steps of the run's schedule so far (this node's count; a join or a fall-behind moves it to the run's)."""
        return self.worker.inner.step

    @property
    def shard(self) -> tuple[int, int]:
        """(this node's data shard, the number of shards): draw your batches from your part of the data."""
        return self.worker.shard, self.worker.num_shards

    @property
    def resumed(self) -> bool:
        """This node was restored from its workdir's checkpoint (optimizer, scheduler, θ_ref)."""
        return bool(self._engine is not None and self._engine.resumed)

    @property
    def fingerprint(self) -> str:
        """16 hex characters over θ_ref and the agreed buffers: equal on replicas in step."""
        return self.worker.fingerprint()

    def on_round(self, listener: Callable[[RoundReport], None]) -> None:
        """Call ``listener`` with every round's report (also rounds that did not commit), on the training thread."""
        if self._engine is not None:
            self._engine.listeners.append(listener)

    # -- the loop ------------------------------------------------------------------------------------------------
    def grads_finite(self, loss: torch.Tensor) -> bool:
        """Call after ``loss.backward()``, before ``optimizer.step()``: False when the loss or a gradient of the
        model's trainable parameters holds NaN or ±inf — then skip the optimizer step (the gradients are dropped
        here), as the task-driven loop and ``torch.amp.GradScaler`` do; the skip is counted in the round's report
        (``skipped_steps``). Costs one device synchronisation."""
        inner = self.worker.inner
        present = [p.grad for p in inner.masters if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(present, 2.0) if present else torch.zeros((), device=loss.device)
        if bool(torch.isfinite(loss.detach()).all() & torch.isfinite(norm)):
            return True
        self._skip = ("loss is not finite" if not bool(torch.isfinite(loss.detach()).all())
                      else "a gradient is not finite")
        self.worker.model.zero_grad(set_to_none=True)
        return False

    def step(self, loss: float | torch.Tensor | None = None) -> RoundReport | None:
        """Count one inner step (after the user's ``optimizer.step()``). Every ``H``-th call ends the round: the
        pseudo-gradient is encoded and exchanged, the outer step applied and θ_ref (with overlap, the shifted local
        state) written into the model's parameters and buffers in place, the checkpoint written. Returns that round's
        report (``RoundReport``), or None between rounds (and for the first round of an overlapped run, applied at the
        next boundary). ``loss``: the step's training loss, for the report (a tensor costs a device sync; None: not
        recorded). After ``done`` it does nothing and returns None. Raises ``JoinRefused`` when the node had to join
        again (a lost lease, a coordinator restart) and the run refused it (e.g. it evicted this node: ``done`` is then
        True and ``close()`` leaves as usual), RuntimeError once the session is closed."""
        if self._closed:
            raise RuntimeError("this lowband session is closed")
        if self._done:
            return None
        inner = self.worker.inner
        assert isinstance(inner, ExternalInner)
        inner.count(float(loss) if loss is not None else None, self._skip)
        self._skip = ""
        if inner.round_steps < self.H:
            return None
        stats = inner.take_stats(0)
        self._in_step = True
        try:
            report = self._lead(stats) if self._engine is not None else self._follow()
        except Stopped:
            self._done, report = True, None
        except JoinRefused:  # joining again was refused (e.g. the run evicted this node): the state is whole, so
            self._in_step, self._done = False, True  # close() leaves as the daemon does (exit checkpoint, Leave)
            raise
        self._in_step = False
        self.last_report = report or self.last_report
        return report

    def _lead(self, stats: Any) -> RoundReport | None:
        engine = self._engine
        assert engine is not None
        report = engine.end_round(stats)
        while True:
            if engine.finished:
                report = engine.drain() or report
                self._done = True
                break
            if not engine.before_round():
                break
        if self._group is not None:
            self._group.send_round(self.worker, done=self._done, report=asdict(report) if report else None)
        return report

    def _follow(self) -> RoundReport | None:
        assert self._group is not None
        packet = self._group.receive(self.worker)
        self._done = bool(packet.get("done")) or packet["kind"] == "stop"
        report = packet.get("report")
        if report is None:
            return None
        report["members"] = tuple(report["members"])
        return RoundReport(**report)

    def close(self) -> None:
        """Leave the run: the exit checkpoint (when a round was applied here) and Leave, then release connections
        and threads. Steps of a round not finished are dropped (and with overlap the round in flight). Idempotent.
        After an exception inside ``step()`` nothing is written (the state may be half-updated): the last checkpoint
        stays, and the run drops this node when its lease expires."""
        if self._closed:
            return
        self._closed = True
        orderly = not self._in_step
        engine, group = self._engine, self._group
        try:
            if engine is not None:
                if not self._done:
                    self._stop.set()  # leave as a node that stops, not one whose run ended
                if orderly:
                    try:
                        engine.leave()
                    except Stopped:
                        pass
            elif group is not None and group.open and orderly:
                while group.open:  # the leader's remaining packets, up to its stop
                    self._group.receive(self.worker)  # type: ignore[union-attr]
        finally:
            if engine is not None:
                if group is not None and group.open and orderly:
                    group.send_stop()
                engine.shutdown()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def join(model: nn.Module, optimizer: torch.optim.Optimizer, *, workdir: str | Path,
         run: str | Path | RunFile | None = None, coordinator: str | None = None, dht: Sequence[str] | None = None,
         scheduler: Scheduler | None = None, name: str = "", token: str = "", tls_ca: str | None = None,
         tls_cert: str | None = None, tls_key: str | None = None, insecure: bool = False,
         dht_listen: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",), max_rounds: int | None = None,
         checkpoint_every: int = 1, round_timeout_s: float = 3600.0, stop: threading.Event | None = None,
         plane: ControlPlane | None = None, clock: Clock = SYSTEM_CLOCK, connect_timeout_s: float = 300.0) -> Session:
    """Join a run with your model and optimizer; returns the ``Session`` your loop calls ``step()`` on.

    - ``model``: your ``nn.Module`` (or its DDP wrapper), already on its device. It must be the run's model: the
      same parameter and persistent-buffer names, shapes, dtypes and ``requires_grad`` as what the run's task
      builds (``[run] task`` and ``[task]`` in the run file), else ``ModelMismatch`` lists the differences. Its
      parameters and buffers are **overwritten in place** with the run's: the task's seeded initial values in a run
      that has not started, this node's checkpoint when ``workdir`` holds one of this run, else the state downloaded
      from the run. Frozen parameters take the task's seeded values and are never exchanged.
    - ``optimizer``: your inner optimizer over the model's parameters (made before ``join``: the parameters are
      updated in place, so it stays valid). ``scheduler``: your LR scheduler, stepped once per inner step, if any.
      Both are restored from the checkpoint on restart (docs/api.md says exactly what).
    - ``workdir``: the node's directory: ``node.key`` (its identity), ``checkpoint.safetensors``, ``rounds.jsonl``.
      Restarting with the same workdir resumes the node.
    - ``run``: the run file (path or parsed ``RunFile``): required with ``dht``; with ``coordinator`` the join is
      refused if it differs from the coordinator's run.
    - ``coordinator``: ``HOST:PORT`` of a ``lowband coordinator``; or ``dht``: multiaddrs of DHT peers (serverless:
      the run file must carry its ``[authority]``; a closed run needs the authority's grant in ``workdir/grant.toml``,
      ``lowband run grant``, whose name is the node's).
    - ``name``: the node's name (default ``HOST-WORKDIRNAME``); ``token``: the run's join token; ``tls_ca``,
      ``tls_cert``, ``tls_key``: TLS to the coordinator (plaintext is refused off loopback unless ``insecure``).
    - ``max_rounds``: leave after this many applied rounds; ``checkpoint_every``: applied rounds between checkpoints;
      ``round_timeout_s``: the longest one exchange may take (seconds).
    - ``stop``: an event that, once set (e.g. by your SIGTERM handler), ends the session's waits: the current
      ``step()`` returns with ``done`` True, and ``close()`` leaves as a node that stops.
    - ``plane``: an already built control plane (tests and embedding: an ``InProcessRun.plane``, which takes its own
      stop event: pass the same one as ``stop``); ``clock``: what waits are decided on.
    - ``connect_timeout_s``: how long to retry a coordinator that does not answer at all before raising
      ``CoordinatorUnreachable`` (as ``lowband node --connect-timeout``; ≤ 0: retry forever). A line on stderr
      between tries says why and when it gives up.

    Under ``torchrun`` (more than one local process, ``torch.distributed`` initialised by you or from the
    environment) call it on every local rank with the same arguments: rank 0 joins the run, the others follow it.

    Blocks while joining (and downloading the run's state). Raises ``ModelMismatch``, ``JoinRefused`` (the run
    refused this node: the reason names the differing fields), ``CoordinatorUnreachable`` (no answer within
    ``connect_timeout_s``), ``ConfigError`` (arguments, the run file, a recipe this API cannot drive, an optimizer
    over tensors not in the model, a scheduler whose state is not JSON-able, a TLS problem no retry fixes)."""
    if (coordinator is None) == (dht is None) and plane is None:
        raise ConfigError("give either coordinator='HOST:PORT' or dht=[MADDR, ...]")
    if checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
    run_file = load_run_file(run) if isinstance(run, (str, Path)) else run
    if dht is not None and run_file is None:
        raise ConfigError("dht needs run=RUN.toml: there is no coordinator to hand out the run")
    workdir = Path(workdir)
    tls = None
    if coordinator is not None and plane is None:
        from node.cli_checks import coordinator_address
        from node.transport.grpc_auth import ClientTls, check_plaintext

        # as `lowband node --coordinator`: a scheme, no port or a bad port is said at once (else "http://h:7070"
        # reads as a host off loopback and is refused for plaintext, and a bare host is retried forever)
        coordinator = coordinator_address(coordinator, "coordinator")
        tls = ClientTls.from_files(tls_ca, tls_cert, tls_key) if (tls_ca or tls_cert) else None
        check_plaintext(coordinator, tls, insecure)
    dht_settings = None
    if dht is not None and run_file is not None:
        from node.dht_cli import serverless_settings
        from node.dht_peer import nat_enabled

        peers = [dht] if isinstance(dht, str) else list(dht)
        listen = [dht_listen] if isinstance(dht_listen, str) else list(dht_listen)
        # the run's [authority], the workdir's node.key and grant.toml (a closed run's grant names the node)
        dht_settings, granted = serverless_settings(run_file, str(run) if isinstance(run, (str, Path)) else "run file",
                                                    workdir, name or None, peers, listen, nat_enabled(listen, False))
        name = granted or name
    name = name or _default_name(workdir)
    from node.membership import check_node_name

    problem = check_node_name(name)
    if problem:
        raise ConfigError(f"name: {problem}")
    if coordinator is not None and plane is None and connect_timeout_s > 0:
        from node.cli_checks import wait_for_coordinator

        # after every local check: a wrong argument is said at once, not after the coordinator answers
        wait_for_coordinator(coordinator, tls, connect_timeout_s, ca_path=tls_ca or "")
    model = _unwrap(model)
    device = next((p.device.type for p in model.parameters()), "cpu")
    opts = NodeOptions(coordinator or "", workdir, name, device, run_file.run if run_file else None, token,
                       max_rounds, round_timeout_s, dht_settings, checkpoint_every, tls=tls)
    source = _UserModel(name, model, optimizer, scheduler)
    stop = stop if stop is not None else threading.Event()
    group = LocalGroup.from_env(device, round_timeout_s)
    if group is not None and not group.leader:
        return _join_follower(source, stop, group, workdir)
    engine = RoundEngine(opts, stop, source, plane=plane, clock=clock)
    try:
        info = engine.join()
        if group is not None:
            assert engine.cfg is not None and engine.worker is not None
            group.send_start(engine.cfg, engine.worker)
        engine.enter(info)
        session = Session(engine, source, stop, group)
        session._done = engine.finished
        if group is not None:
            group.send_round(engine.worker, done=session.done, report=None)
        return session
    except BaseException:
        if group is not None and group.open:
            group.send_stop()
        engine.shutdown()
        raise


def _join_follower(source: _UserModel, stop: threading.Event, group: LocalGroup, workdir: Path) -> Session:
    """A local rank other than 0: build the same worker around this rank's copy of the model, take rank 0's state."""

    def make(cfg: RunConfig, shard: int, num_shards: int) -> Worker:
        task, _ = source.describe(cfg)
        return source.build(cfg, task, JoinInfo(shard, num_shards, 0, 0), None)  # rank 0 alone signs frames

    worker = group.receive_start(make)
    if worker is None:
        raise JoinRefused("local rank 0 did not join the run (see its log)")
    session = Session(None, source, stop, group)
    session._worker = worker
    packet = group.receive(worker)
    session._done = bool(packet.get("done")) or packet["kind"] == "stop"
    return session


def __getattr__(name: str) -> Any:
    if name == "LowbandCallback":  # transformers is imported only when the callback is asked for
        from node.integrations.hf import LowbandCallback

        return LowbandCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
