"""A real coordinator on 127.0.0.1 (port 0) for the security tests, with generated certificates (tmp dirs only):
``make_pki`` (a CA, a server certificate for 127.0.0.1, and a second, unrelated CA), ``Trial`` (a coordinator plus
honest members that train real frames and check every round's fingerprints), and helpers that act as an attacker
(raw channels, hand-made metadata). Every RPC and every wait is bounded."""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.core import PROTOCOL_VERSION
from coordinator.guard import ServerLimits
from coordinator.server import SERVICE_NAME, CoordinatorServer
from coordinator.startup import ServerTls
from coordinator.store import Disk
from node.certs import CertificateAuthority
from node.clock import SYSTEM_CLOCK, Clock
from node.config import run_config_from_dict
from node.identity import NodeKey
from node.proto.lowband.v1 import coordinator_pb2 as pb
from node.proto.lowband.v1 import coordinator_pb2_grpc as pb_grpc
from node.runfile import build_run_file
from node.tasks import load_task
from node.train.worker import Worker
from node.transport.grpc_auth import (MD_NODE, MD_NONCE, MD_SIG, MD_SUBMIT, MD_TS, ClientTls, request_digest,
                                      rpc_message, submit_digest)
from node.transport.grpc_client import GrpcTransport, Identity

RPC_S = 10.0  # every RPC is bounded by this
ROUND_S = 30.0  # every wait for a round by this
SERVICE = "/lowband.v1.Coordinator/"


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    authority: CertificateAuthority
    wrong_ca: Path  # a CA that issued nothing the coordinator uses

    def server_tls(self, client_ca: bool = False) -> ServerTls:
        return ServerTls(self.server_cert.read_bytes(), self.server_key.read_bytes(),
                         self.ca.read_bytes() if client_ca else None)

    def client_tls(self, workdir: Path | None = None, ca: Path | None = None) -> ClientTls:
        """Server authentication by ``ca`` (default: the right one); with ``workdir`` also its node certificate."""
        cert = key = None
        if workdir is not None:
            cert, key = (workdir / "tls.pem").read_bytes(), (workdir / "tls.key").read_bytes()
        return ClientTls((ca or self.ca).read_bytes(), cert, key)

    def node_cert(self, workdir: Path, key: NodeKey) -> Path:
        workdir.mkdir(parents=True, exist_ok=True)
        self.authority.issue_node(key, workdir / "tls.pem", workdir / "tls.key")
        return workdir


def make_pki(root: Path) -> Pki:
    ca = CertificateAuthority.load_or_create(root / "ca")
    issued = ca.issue_server(["127.0.0.1", "localhost"], root / "ca" / "server.pem", root / "ca" / "server.key")
    wrong = CertificateAuthority.load_or_create(root / "wrong-ca")
    return Pki(ca.path, issued.cert, issued.key, ca, wrong.path)


def run_text(membership: dict[str, Any] | None = None, rounds: dict[str, Any] | None = None) -> str:
    return build_run_file(
        run_id="security", recipe="sign", rounds=100,
        task_params={"size": "tiny", "batch_size": 2, "block_size": 32, "eval_batches": 1}, recipe_overrides={"H": 1},
        membership={"min_nodes": 2, "max_nodes": 4, "heartbeat_s": 2.0, "lease_s": 30.0, **(membership or {})},
        rounds_policy={"initial_wait_s": 60.0, "max_wait_s": 60.0, "eval_every": 0, **(rounds or {})})


@dataclass
class Member:
    name: str
    transport: GrpcTransport
    worker: Worker
    frames: dict[int, bytes] = field(default_factory=dict)


class Trial:
    """A coordinator over ``root/state`` and the members joined through ``join``. ``tls``: the server's TLS;
    ``client_tls``: what members use by default."""

    def __init__(self, root: Path, *, tls: ServerTls | None = None, client_tls: ClientTls | None = None,
                 limits: ServerLimits | None = None, disk: Disk | None = None, membership: dict[str, Any] | None = None,
                 rounds: dict[str, Any] | None = None, watchdog_clock: Clock = SYSTEM_CLOCK,
                 start_watchdog: bool = True) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "run.toml").write_text(run_text(membership, rounds))
        self.server = CoordinatorServer("127.0.0.1:0", root / "state", root / "run.toml", tls=tls, limits=limits,
                                        disk=disk, watchdog_clock=watchdog_clock, start_watchdog=start_watchdog)
        self.server.start()
        self.address = self.server.address
        self.client_tls = client_tls
        self.token = (membership or {}).get("join_token", "")
        self.members: dict[str, Member] = {}
        self._closables: list[Any] = []
        info = pb.GetRunResponse(**self.core.run_info(PROTOCOL_VERSION, self.token))  # not over the network: mTLS needs a cert
        self.info = info
        self.cfg = run_config_from_dict(json.loads(info.config_json))
        self.task = load_task(self.cfg.task.name, **self.cfg.task.params)

    @property
    def core(self) -> Any:
        return self.server.core

    def transport(self, key: NodeKey | None = None, tls: ClientTls | None = None, **kw: Any) -> GrpcTransport:
        t = GrpcTransport(self.address, rpc_timeout_s=RPC_S, key=key, tls=tls or self.client_tls, token=self.token,
                          **kw)
        self._closables.append(t)
        return t

    def identity(self, name: str) -> Identity:
        i = self.info
        return Identity(name, i.config_json, i.config_hash, i.task_fingerprint, i.model_digest, ("device=cpu",),
                        self.token)

    def join(self, name: str, key: NodeKey | None = None, tls: ClientTls | None = None) -> Member:
        t = self.transport(key, tls)
        t.identity = self.identity(name)
        resp = t.join()
        m = self.members[name] = Member(name, t, Worker(name, self.cfg, self.task, resp.shard, resp.num_shards,
                                                        key=t.key))  # it signs its frames with the key it joined with
        return m

    def channel(self, tls: ClientTls | None = None) -> grpc.Channel:
        """A raw channel (no signing): what an attacker without the node's key has."""
        opts = [("grpc.max_send_message_length", 16 << 20)]
        tls = tls or self.client_tls
        ch = grpc.secure_channel(self.address, tls.credentials(), options=opts) if tls else grpc.insecure_channel(
            self.address, options=opts)
        self._closables.append(ch)
        return ch

    def stub(self, tls: ClientTls | None = None) -> pb_grpc.CoordinatorStub:
        return pb_grpc.CoordinatorStub(self.channel(tls))

    @property
    def open_round(self) -> int:
        return int(self.stub().Status(pb.StatusRequest(read_token=self.token), timeout=RPC_S).current_round)

    def frame(self, name: str, round_: int) -> bytes:
        m = self.members[name]
        if round_ not in m.frames:
            m.worker.train()
            m.frames[round_] = m.worker.prepare(round_)
        return m.frames[round_]

    def honest_round(self, names: tuple[str, ...] = ("a", "b")) -> int:
        """Every named member submits, then collects; the round commits with exactly them and every replica (and the
        coordinator's reference) has the same fingerprint. Returns the round."""
        r = self.core.open_round
        for name in names:
            assert self.members[name].transport.submit(r, self.frame(name, r), loss=2.0) == "accepted"
        fingerprints = set()
        for name in names:
            m = self.members[name]
            res = m.transport.collect(r, ROUND_S, submitted=True, own=self.frame(name, r), own_name=name)
            assert res.committed and res.members == tuple(sorted(names)), (res.status, res.reason, res.members)
            assert m.worker.apply(res).committed
            fingerprints.add(m.worker.fingerprint())
            assert m.worker.fingerprint() == res.reference_fingerprint
        assert fingerprints == {self.core.reference.fingerprint()}
        return r

    def close(self) -> None:
        for c in self._closables:
            c.close()
        self.server.stop(grace=0.5)


def rpc_error(call: Any, *args: Any, **kw: Any) -> grpc.RpcError:
    """The RpcError a call ends with (a server-streaming call is drained); fails the test if it succeeds."""
    try:
        out = call(*args, timeout=kw.pop("timeout", RPC_S), **kw)
        if hasattr(out, "__iter__") and not hasattr(out, "DESCRIPTOR"):
            list(out)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"{call} succeeded")


def signed_metadata(key: NodeKey, node_id: str, method: str, *, request: Any = None, submit: tuple[int, int] | None
                    = None, wall: float | None = None) -> list[tuple[str, Any]]:
    """The metadata a node's interceptor would attach (node/transport/grpc_auth.py), made by hand: for requests sent
    through raw channels (an idle upload whose first chunk never comes, a replay, a forged timestamp)."""
    ts, nonce = int((time.time() if wall is None else wall) * 1000), secrets.token_hex(8)
    digest = submit_digest(*submit) if submit else request_digest(request.SerializeToString())
    md: list[tuple[str, Any]] = [(MD_NODE, node_id), (MD_TS, str(ts)), (MD_NONCE, nonce),
                                 (MD_SIG, key.sign(rpc_message(SERVICE + method, node_id, ts, nonce, digest)))]
    if submit:
        md.append((MD_SUBMIT, f"{submit[0]}:{submit[1]}"))
    return md


class Idle:
    """A request iterator that sends nothing until ``release`` (an upload stream held open by its client)."""

    def __init__(self) -> None:
        import threading

        self.released = threading.Event()

    def __iter__(self) -> Iterator[Any]:
        self.released.wait(120)  # a generator: gRPC's sending thread waits here, not the caller
        yield from ()

    def release(self) -> None:
        self.released.set()


class Health:
    """The coordinator's health as gRPC's Watch streams it (no polling)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                                timeout=120)

    def next_status(self, want: int) -> int:
        for resp in self.stream:
            if resp.status == want:
                return resp.status
        raise AssertionError("health stream ended")
