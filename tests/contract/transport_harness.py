"""Groups of connected transports of one kind — in-process hub, gRPC coordinator (a real server on 127.0.0.1:0),
hivemind DHT (a DHT + p2pd per peer, 127.0.0.1, NAT traversal off) — for the transport contract suite.

Every kind is driven only through the ``Transport`` interface; what differs is how a group is built and how a
late joiner gets ready to fetch state (a gRPC joiner must join the coordinator first; a DHT joiner must not
heartbeat, or the peers would wait for its frame)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from node.runfile import load_run_file
from node.config import RunConfig
from node.tasks import load_task
from node.train.reference import model_digest
from node.train.worker import Worker
from node import wire
from node.transport.base import Transport
from node.transport.control import Identity

KINDS = ("inprocess", "grpc", "dht")
RUN_FILE = """
[run]
id = "contract-{kind}"
task = "gpt"
recipe = "sign"
rounds = 100
seed = 0

[task]
size = "tiny"
batch_size = 2
block_size = 32
eval_batches = 1

[recipe]
H = 1

[membership]
min_nodes = 1
max_nodes = 8
heartbeat_s = 0.5
lease_s = 5.0

[rounds]
initial_wait_s = {wait}
min_wait_s = {wait}
max_wait_s = {wait}
eval_every = 0
"""
DHT_NET: dict[str, Any] = {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "nat_port_map": False, "auto_nat": False,
                           "use_relay": False}


class Group:
    """``names`` joined to one run over ``kind``, each with a Worker that makes real frames for it."""

    def __init__(self, kind: str, names: tuple[str, ...], root: Path, round_wait_s: float) -> None:
        self.kind, self.root, self.round_wait_s = kind, root, round_wait_s
        run_path = root / "run.toml"
        run_path.write_text(RUN_FILE.format(kind=kind, wait=round_wait_s))
        self.run_file = load_run_file(run_path)
        self.cfg: RunConfig = self.run_file.run
        self.task = load_task(self.cfg.task.name, **self.cfg.task.params)
        self.transports: dict[str, Transport] = {}
        self.workers: dict[str, Worker] = {}
        self._all: list[Transport] = []
        self.server: Any = None
        self.hub: Any = None
        try:
            if kind == "inprocess":
                from node.transport.inprocess import InProcessHub

                self.hub = InProcessHub()
            elif kind == "grpc":
                from coordinator.server import CoordinatorServer

                self.server = CoordinatorServer("127.0.0.1:0", root / "state", run_path)
                self.server.start()
            for i, name in enumerate(names):
                t = self.connect(name)
                t.join()
                self.transports[name] = t
                self.workers[name] = Worker(name, self.cfg, self.task, shard=i, num_shards=8)
        except BaseException:
            self.close()
            raise

    def connect(self, name: str) -> Transport:
        """A new, not yet joined transport of this group's kind."""
        t: Transport
        if self.kind == "inprocess":
            t = self.hub.connect(name)
        elif self.kind == "grpc":
            from node.transport.grpc_client import GrpcTransport

            t = GrpcTransport(self.server.address, rpc_timeout_s=10.0)
            probe = self.task.build_model(self.cfg.seed)
            digest = model_digest(wire.model_spec([(n, p) for n, p in probe.named_parameters() if p.requires_grad]))
            t.identity = Identity(name, json.dumps(self.cfg.to_dict()), self.cfg.config_hash(self.task.fingerprint),
                                  self.task.fingerprint, digest)
        else:
            from node.transport.dht import DhtTransport

            boot = [] if not self._all else self._all[0].visible_maddrs()  # type: ignore[attr-defined]
            t = DhtTransport.create(self.cfg.run_id, name, boot, round_wait_s=self.round_wait_s,
                                    heartbeat_s=0.5, **DHT_NET)
        self._all.append(t)
        return t

    def joiner(self, name: str) -> Transport:
        """A transport ready to fetch the run's state (and not yet a member any peer waits for)."""
        t = self.connect(name)
        if self.kind == "grpc":
            t.join()  # the coordinator serves state to members only
        return t

    def frame(self, name: str, round_: int) -> bytes:
        w = self.workers[name]
        w.train()
        return w.prepare(round_)

    def close(self) -> None:
        for t in self._all:
            try:
                close = getattr(t, "close", None)
                close() if close is not None else t.leave()
            except Exception:
                pass
        if self.server is not None:
            self.server.stop(grace=0.5)
