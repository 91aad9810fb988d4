"""A multi-process node: N local processes (``torchrun --nproc-per-node N``) that train one data-parallel replica.

Local rank 0 — the *leader* — is the node: it alone joins the run, sends the node's frame, applies rounds, writes the
workdir's checkpoint and round log. The other ranks — *followers* — only train: DDP (``DistributedDataParallel``)
all-reduces every inner step's gradients, so the N copies take identical steps from identical states; at each round
boundary the leader broadcasts what the round changed locally, so they start the next round from exactly its state.

What crosses the local group, always from the leader, as broadcasts in one fixed order (``send_*`` / ``follow``):

- ``start``: the run's configuration and the node's shard (a JSON packet);
- ``round`` (before each round's inner steps): the inner step count and data position, then the local model — the
  fp32 masters of the trainable parameters and the persistent buffers — and, only when the leader's optimizer state
  was replaced (restored from a checkpoint, or reset after a poisoned round), that state too;
- ``stop``: the node ends; followers exit 0.

The round's inner steps per node, its data and its bytes on the wire are the node's: each rank draws its own part of
the node's shard (``shard × N + rank`` of ``num_shards × N``), so one round of a node trains H × N batches.

Backends: NCCL when the node trains on CUDA (one GPU per local rank: ``cuda:LOCAL_RANK``), gloo on CPU. The group's
timeout is long (a follower waits in a broadcast while the leader joins, downloads the state or waits for a round).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from node.config import RunConfig, run_config_from_dict
from node.errors import ConfigError

if TYPE_CHECKING:
    from node.train.worker import Worker

log = logging.getLogger(__name__)


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"not a torch dtype: {name}")
    return value


class LocalGroup:
    """The node's local process group. ``rank``/``world``: this process's local rank and the number of processes;
    ``device``: where this rank trains (``cuda:LOCAL_RANK`` or ``cpu``)."""

    def __init__(self, rank: int, world: int, device: torch.device) -> None:
        self.rank, self.world, self.device = rank, world, device
        self.open = True
        self._started = False  # the leader sent ``start``
        self._sent_epoch = -1  # the leader's optimizer epoch the followers hold

    @classmethod
    def from_env(cls, device: str, round_timeout_s: float = 3600.0) -> "LocalGroup | None":
        """The group torchrun described in the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), initialised; None
        for a single process. Raises ConfigError for processes on several machines (one lowband node is one machine:
        several machines are several nodes)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        if int(os.environ.get("LOCAL_WORLD_SIZE", str(world))) != world:
            raise ConfigError("a lowband node is one machine: start it with torchrun --nnodes 1 (several machines are "
                              "several nodes, each joining the run)")
        rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
        if device.startswith("cuda"):
            dev = torch.device("cuda", rank)
            torch.cuda.set_device(dev)
            backend = "nccl"
        else:
            dev, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            timeout = datetime.timedelta(seconds=max(1800.0, 2 * round_timeout_s))
            dist.init_process_group(backend, timeout=timeout)
        log.info("local rank %d of %d on %s (%s)%s", rank, world, dev, backend,
                 ": this process talks to the run" if rank == 0 else "")
        return cls(rank, world, dev)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def data_shard(self, shard: int, num_shards: int) -> tuple[int, int]:
        """This rank's part of the node's data shard: ``(shard × world + rank, num_shards × world)``."""
        return shard * self.world + self.rank, num_shards * self.world

    def wrap(self, model: nn.Module) -> nn.Module:
        """The DDP module the inner steps run forward and backward through (a collective: every rank at once)."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def agree(self, problem: str | None) -> str | None:
        """One skip decision for a step on every rank: skipped everywhere when any rank saw a non-finite value."""
        flag = torch.tensor([0.0 if problem is None else 1.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if problem is None and float(flag) > 0:
            return "another local rank's loss or gradient is not finite"
        return problem

    # -- leader ------------------------------------------------------------------------------------------
    def send_start(self, cfg: RunConfig, worker: "Worker") -> None:
        self._json({"kind": "start", "cfg": cfg.to_dict(), "shard": worker.shard, "num_shards": worker.num_shards})
        self._started = True

    def send_round(self, worker: "Worker", **extra: Any) -> None:
        """Before a round's inner steps: the followers take the leader's local state (``extra``: JSON-able fields
        the followers' driver reads, e.g. the API's ``done``)."""
        inner = worker.inner
        resend = inner.optimizer_epoch != self._sent_epoch
        self._json({"kind": "round", "step": inner.step, "drawn": inner.drawn, "optimizer": resend,
                    "inner_extra": inner.extra_state() if resend else None, **extra})
        self._state(worker, resend)
        self._sent_epoch = inner.optimizer_epoch

    def send_stop(self, worker: "Worker | None" = None) -> None:
        """The node ends; with ``worker`` (once ``start`` was sent), the followers take its final local state first."""
        worker = worker if self._started else None
        self._json({"kind": "stop", "state": worker is not None})
        if worker is not None:
            self._state(worker, False)
            log.info("local rank 0: final local state %s", local_fingerprint(worker))
        self.open = False

    # -- followers ---------------------------------------------------------------------------------------
    def follow(self, make_worker: Callable[[RunConfig, int, int], "Worker"]) -> int:
        """A follower's life: build the worker the leader describes, take its state before every round, train.
        Returns 0 when the leader stops the node."""
        worker = self.receive_start(make_worker)
        if worker is None:
            return 0
        while True:
            packet = self.receive(worker)
            if packet["kind"] == "stop":
                return 0
            worker.train()
            self.trained(worker, packet.get("round"))

    def receive_start(self, make_worker: Callable[[RunConfig, int, int], "Worker"]) -> "Worker | None":
        packet = self._json(None)
        if packet["kind"] == "stop":
            self.open = False
            return None
        return make_worker(run_config_from_dict(packet["cfg"]), int(packet["shard"]), int(packet["num_shards"]))

    def receive(self, worker: "Worker") -> dict[str, Any]:
        """The leader's next packet (``round`` or ``stop``), its state loaded into ``worker``."""
        packet = self._json(None)
        if packet["kind"] == "stop":
            self.open = False
            if packet.get("state"):
                self._state(worker, False)
                log.info("local rank %d: final local state %s", self.rank, local_fingerprint(worker))
            return packet
        inner = worker.inner
        inner.step = int(packet["step"])
        if int(packet["drawn"]) != inner.drawn:
            inner.seek(int(packet["drawn"]))
        self._state(worker, bool(packet["optimizer"]))
        if packet["optimizer"] and packet.get("inner_extra") is not None:
            inner.load_extra_state(packet["inner_extra"])
        return packet

    def trained(self, worker: "Worker", round_: int | None) -> None:
        """After a round's inner steps (every rank): at DEBUG, the local state's fingerprint — equal on every rank when
        the replica's processes stepped in lockstep (it costs a pass over the model, so only when asked for)."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("local rank %d: round %s trained, local state %s", self.rank, round_, local_fingerprint(worker))

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- transfers ---------------------------------------------------------------------------------------
    def _json(self, packet: dict[str, Any] | None) -> dict[str, Any]:
        """Broadcast a JSON packet from the leader (``packet``; None on followers) and return it everywhere."""
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        data = b""
        if self.leader:
            assert packet is not None
            data = json.dumps(packet, separators=(",", ":")).encode()
            size[0] = len(data)
        dist.broadcast(size, 0)
        buf = torch.empty(int(size), dtype=torch.uint8, device=self.device)
        if self.leader:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buf, 0)
        return packet if self.leader else json.loads(buf.cpu().numpy().tobytes())

    def _tensor(self, t: torch.Tensor) -> None:
        """Broadcast ``t`` in place (through the group's device when it lives elsewhere)."""
        if t.device == self.device:
            dist.broadcast(t.data, 0)
            return
        moved = t.detach().to(self.device)
        dist.broadcast(moved, 0)
        if not self.leader:
            with torch.no_grad():
                t.copy_(moved)

    def _state(self, worker: "Worker", optimizer: bool) -> None:
        with torch.no_grad():
            for m in worker.masters:
                self._tensor(m)
            worker.inner.sync_model()
            for b in worker.buffers:
                self._tensor(b)
        if optimizer and worker.inner.optimizer is not None:
            self._optimizer(worker.inner.optimizer)

    def _optimizer(self, opt: torch.optim.Optimizer) -> None:
        """The leader's optimizer state (tensors by parameter index and key, in a described order) into every
        follower's optimizer."""
        params = [p for g in opt.param_groups for p in g["params"]]
        layout = None
        if self.leader:
            layout = [[i, key, list(v.shape), str(v.dtype), v.device.type == "cpu"] if isinstance(v, torch.Tensor)
                      else [i, key, v]
                      for i, p in enumerate(params) for key, v in sorted(opt.state.get(p, {}).items())]
        layout = self._json({"layout": layout})["layout"]
        state: dict[int, dict[str, Any]] = {}
        for item in layout:
            i, key = item[0], item[1]
            if len(item) == 3:
                state.setdefault(i, {})[key] = item[2]
                continue
            shape, dtype, on_cpu = item[2], _dtype(item[3]), item[4]
            if self.leader:
                t = opt.state[params[i]][key]
            else:
                t = torch.empty(shape, dtype=dtype, device="cpu" if on_cpu else params[i].device)
            self._tensor(t)
            state.setdefault(i, {})[key] = t
        if not self.leader:
            opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def exec_torchrun(nproc: int, argv: list[str]) -> None:
    """``lowband node --nproc N``: the same command (``argv``, without ``--nproc``) under torchrun, N local processes;
    the rendezvous takes a free port on the loopback (``--standalone``). Replaces this process (same pid)."""
    import sys

    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    # "--": torchrun's parser would take lowband's --run for an abbreviation of its own --run-path
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                              f"--nproc-per-node={nproc}", "-m", "--", "node.cli", *rest])


def local_fingerprint(worker: "Worker") -> str:
    """16 hex characters over the local model (masters then buffers): equal on every rank of a node in step."""
    from node.train.reference import tensors_fingerprint

    return tensors_fingerprint([m.detach().float() for m in worker.masters] + list(worker.buffers))
