"""Groups of joined control planes of one kind — an in-process run, a gRPC coordinator (a real server on
127.0.0.1:0), a hivemind DHT (a DHT + p2pd per peer, 127.0.0.1, NAT traversal off) — for the contract suite.

Every kind is driven only through the ``ControlPlane`` seam (node/transport/control.py); what differs is how a group
is built. Each member has a ``Worker`` that makes real frames for it."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from node import wire
from node.identity import NodeKey
from node.runfile import build_run_file, load_run_file
from node.tasks import load_task
from node.train.reference import model_digest
from node.train.worker import Worker
from node.transport.control import ControlPlane, Identity, JoinInfo
from node.transport.limits import ResultLimits
from node.transport.messages import Submission

KINDS = ("inprocess", "grpc", "dht")
DHT_NET = ("/ip4/127.0.0.1/tcp/0",)


def run_file(kind: str, round_wait_s: float, rounds_extra: dict[str, Any] | None = None) -> str:
    """The contract's run file; ``rounds_extra``: more ``[rounds]`` keys (e.g. ``result``)."""
    return build_run_file(
        run_id=f"contract-{kind}", recipe="sign", rounds=100,
        task_params={"size": "tiny", "batch_size": 2, "block_size": 32, "eval_batches": 1},
        recipe_overrides={"H": 1}, membership={"min_nodes": 1, "max_nodes": 8, "heartbeat_s": 0.5, "lease_s": 5.0},
        rounds_policy={"initial_wait_s": round_wait_s, "min_wait_s": round_wait_s, "max_wait_s": round_wait_s,
                       "eval_every": 0, **(rounds_extra or {})})


class Group:
    """``names`` joined to one run over ``kind``."""

    def __init__(self, kind: str, names: tuple[str, ...], root: Path, round_wait_s: float,
                 rounds_extra: dict[str, Any] | None = None) -> None:
        self.kind, self.root, self.round_wait_s = kind, root, round_wait_s
        run_path = root / "run.toml"
        run_path.write_text(run_file(kind, round_wait_s, rounds_extra))
        self.run_file = load_run_file(run_path)
        self.cfg = self.run_file.run
        self.task = load_task(self.cfg.task.name, **self.cfg.task.params)
        probe = self.task.build_model(self.cfg.seed)
        self.digest = model_digest(wire.model_spec([(n, p) for n, p in probe.named_parameters() if p.requires_grad]))
        self.planes: dict[str, ControlPlane] = {}
        self.joined: dict[str, JoinInfo] = {}
        self.workers: dict[str, Worker] = {}
        self.keys: dict[str, NodeKey] = {}  # each member's identity: it joins with it and signs its frames
        self.stop = threading.Event()
        self._all: list[ControlPlane] = []
        self.server: Any = None
        self.run: Any = None
        self._authority: Any = None
        try:
            if kind == "inprocess":
                from node.transport.inprocess_plane import InProcessRun

                self.run = InProcessRun(self.cfg, self.task, min_nodes=1, num_shards=8, round_wait_s=round_wait_s)
            elif kind == "grpc":
                from coordinator.server import CoordinatorServer

                self.server = CoordinatorServer("127.0.0.1:0", root / "state", run_path)
                self.server.start()
            for name in names:
                self.planes[name] = self.connect(name)
                self.joined[name] = self.planes[name].join(self.identity(name))
                info = self.joined[name]
                self.workers[name] = Worker(name, self.cfg, self.task, shard=info.shard, num_shards=info.num_shards,
                                            key=self.key(name))
                bound = getattr(self.planes[name], "bound_results", None)  # as the daemon does (node/engine.py)
                if bound is not None:
                    bound(ResultLimits.for_model(self.workers[name].reference, info.num_shards))
        except BaseException:
            self.close()
            raise

    def key(self, name: str) -> NodeKey:
        return self.keys.setdefault(name, NodeKey.generate())

    def identity(self, name: str) -> Identity:
        return Identity(name, json.dumps(self.cfg.to_dict()), self.cfg.config_hash(self.task.fingerprint),
                        self.task.fingerprint, self.digest, public_key=self.key(name).public)

    def connect(self, name: str) -> ControlPlane:
        """A new, not yet joined plane of this group's kind."""
        plane: ControlPlane
        if self.kind == "inprocess":
            plane = self.run.plane(name, self.stop)
        elif self.kind == "grpc":
            from node.transport.grpc_control import GrpcControl

            plane = GrpcControl(self.server.address, self.stop, key=self.key(name))
        else:
            from node.transport.dht_control import DhtControl, DhtSettings

            boot = () if not self._all else tuple(self._all[0].transport.visible_maddrs())  # type: ignore[attr-defined]
            settings = DhtSettings(initial_peers=boot, host_maddrs=DHT_NET, num_shards=8, min_nodes=1, heartbeat_s=0.5,
                                   round_wait_s=self.round_wait_s, authority=self.authority(), key=self.key(name))
            plane = DhtControl(self.cfg, settings, name, self.stop)
        self._all.append(plane)
        return plane

    def authority(self) -> Any:
        """The run's authority signature (serverless runs need one; an open run: any member may join)."""
        if self._authority is None:
            from node.identity import NodeKey
            from node.transport.dht_authority import signed_record
            from node.transport.dht_trust import RunAuthority

            key = NodeKey.generate()
            self._authority = RunAuthority(key.public, RunAuthority.sign(key, self.cfg.run_id, signed_record(
                self.run_file, open_run=True)), open_run=True)
        return self._authority

    def submission(self, name: str, round_: int) -> Submission:
        """``name``'s worker trains a round and offers it."""
        w = self.workers[name]
        stats = w.train()
        return Submission(round_, w.prepare(round_), name, stats.mean_loss, w.fingerprint())

    def close(self) -> None:
        self.stop.set()
        for plane in self._all:
            try:
                plane.close()
            except Exception:
                pass
        if self.server is not None:
            self.server.stop(grace=0.5)
