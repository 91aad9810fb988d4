"""A real gRPC coordinator on 127.0.0.1 (port 0) against bad input: each bad request gets its precise status
code and details, and afterwards honest nodes (GrpcTransport + Worker) still submit and the round commits
with replicas bit-identical to the coordinator's reference. Bad requests of a member are sent through that member's
own signed stub (``Node.transport.stub``): what is tested is the coordinator's answer to the content, not to a
missing signature (that is tests/security/)."""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import grpc
import safetensors.torch
import torch
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.core import PROTOCOL_VERSION
from coordinator.server import SERVICE_NAME, CoordinatorServer
from node.config import run_config_from_dict
from node.proto.lowband.v1 import coordinator_pb2 as pb
from node.proto.lowband.v1 import coordinator_pb2_grpc as pb_grpc
from node.tasks import load_task
from node.train.worker import Worker
from node.transport.grpc_client import GrpcTransport, Identity
from node.transport.grpc_auth import join_message
from node.transport.state_prefetch import StatePrefetch
from node.identity import NodeKey

RPC_S = 10.0  # every RPC of this module is bounded by this
ROUND_S = 30.0  # and every wait for a round to close by this

RUN_FILE = """
[run]
id = "contract"
task = "gpt"
recipe = "sign"
rounds = 10
seed = 0

[task]
size = "tiny"
batch_size = 2
block_size = 32
eval_batches = 1

[recipe]
H = 1

[membership]
min_nodes = 2
max_nodes = 4
heartbeat_s = 2.0
lease_s = 30.0

[rounds]
initial_wait_s = 60.0
eval_every = 1
"""


@dataclass
class Node:
    name: str
    transport: GrpcTransport
    worker: Worker


@dataclass
class Run:
    server: CoordinatorServer
    channel: grpc.Channel
    stub: pb_grpc.CoordinatorStub
    info: pb.GetRunResponse
    nodes: dict[str, Node]

    @property
    def open_round(self) -> int:
        return int(self.stub.Status(pb.StatusRequest(), timeout=RPC_S).current_round)

    def frame(self, name: str, round_: int) -> bytes:
        w = self.nodes[name].worker
        w.train()
        return w.prepare(round_)

    def honest_round(self, frames: dict[str, bytes] | None = None) -> int:
        """Both honest nodes submit (a by submit + collect, b by exchange); the round commits for both and
        every replica matches the coordinator's fingerprint. Returns the round."""
        r = self.open_round
        frames = dict(frames or {})
        for name in self.nodes:
            frames.setdefault(name, self.frame(name, r))
        a, b = self.nodes["a"], self.nodes["b"]
        assert a.transport.submit(r, frames["a"], loss=2.0) == "accepted"
        res_b = b.transport.exchange(r, frames["b"], ROUND_S, loss=2.0, own_name="b")
        res_a = a.transport.collect(r, ROUND_S, submitted=True, own=frames["a"], own_name="a")
        for node, res in ((a, res_a), (b, res_b)):
            assert res.committed, res.reason
            assert res.members == ("a", "b") and res.payloads == frames
            node.worker.apply(res)
            assert node.worker.fingerprint() == res.reference_fingerprint
        assert self.server.core.reference.fingerprint() == res_a.reference_fingerprint
        assert self.open_round == r + 1
        return r


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    run_file = tmp_path / "run.toml"
    run_file.write_text(RUN_FILE)
    server = CoordinatorServer("127.0.0.1:0", tmp_path / "state", run_file)
    server.start()
    channel = grpc.insecure_channel(server.address)
    transports: list[GrpcTransport] = []
    try:
        stub = pb_grpc.CoordinatorStub(channel)
        info = stub.GetRun(pb.GetRunRequest(protocol_version=PROTOCOL_VERSION), timeout=RPC_S)
        cfg = run_config_from_dict(json.loads(info.config_json))
        task = load_task(cfg.task.name, **cfg.task.params)
        nodes = {}
        for name in ("a", "b"):
            t = GrpcTransport(server.address, rpc_timeout_s=RPC_S)
            transports.append(t)
            t.identity = Identity(name, info.config_json, info.config_hash, info.task_fingerprint, info.model_digest,
                                  ("device=cpu",))
            resp = t.join()
            assert resp.first_round == 0
            nodes[name] = Node(name, t, Worker(name, cfg, task, resp.shard, resp.num_shards, key=t.key))
        yield Run(server, channel, stub, info, nodes)
    finally:
        for t in transports:
            t.close()
        channel.close()
        server.stop(grace=1.0)


def rpc_error(call: Any, *args: Any, **kw: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        out = call(*args, timeout=RPC_S, **kw)
        if hasattr(out, "__iter__") and not isinstance(out, (bytes, str)) and not hasattr(out, "DESCRIPTOR"):
            list(out)  # server-streaming: the status arrives with the stream
    return info.value


def trailing(exc: grpc.RpcError) -> dict[str, str]:
    return dict(exc.trailing_metadata() or ())


def chunk(node_id: str, round_: int, data: bytes, offset: int = 0, total: int | None = None) -> pb.SubmitChunk:
    return pb.SubmitChunk(node_id=node_id, round=round_, offset=offset,
                          total_size=len(data) if total is None else total, data=data, train_loss=1.0)


# -- the contract ------------------------------------------------------------------------------------
def test_health_check_reports_serving(run: Run) -> None:
    health = health_pb2_grpc.HealthStub(run.channel)
    for service in ("", SERVICE_NAME):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_S)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    err = rpc_error(health.Check, health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_get_run_describes_the_run(run: Run) -> None:
    assert run.info.run_id == "contract" and run.info.protocol_version == PROTOCOL_VERSION
    assert json.loads(run.info.config_json)["recipe"]["H"] == 1
    assert run.info.config_hash == run.server.core.config_hash
    # a client of another protocol learns it from GetRun too, before anything else
    err = rpc_error(run.stub.GetRun, pb.GetRunRequest(protocol_version=PROTOCOL_VERSION - 1))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"protocol version {PROTOCOL_VERSION - 1} is not supported" in err.details()


def test_honest_rounds_commit_and_status_reports_members_and_rounds(run: Run) -> None:
    assert run.honest_round() == 0
    assert run.honest_round() == 1
    s = run.stub.Status(pb.StatusRequest(), timeout=RPC_S)
    assert s.run_id == "contract" and s.recipe == "sign"
    assert s.current_round == 2 and s.committed_rounds == 2
    assert sorted(m.name for m in s.members) == ["a", "b"]
    assert all(m.rounds_contributed == 2 and m.bytes_in > 0 and m.capabilities == ["device=cpu"] for m in s.members)
    # no credential material: no session id; a member is named by its public key's id
    assert sorted(m.key_id for m in s.members) == sorted(run.nodes[n].transport.key.key_id for n in ("a", "b"))
    assert all(m.node_id == "" for m in s.members) and s.persistence_error == ""
    assert [r.round for r in s.recent_rounds] == [0, 1]
    assert all(list(r.members) == ["a", "b"] and r.reason == "all 2 live members submitted" for r in s.recent_rounds)
    assert s.recent_rounds[-1].reference_fingerprint == s.reference_fingerprint
    assert s.reference_fingerprint == run.nodes["a"].worker.fingerprint()
    assert list(s.submitted) == [] and s.deadline_in_s < 0


def test_malformed_payload_is_invalid_argument(run: Run) -> None:
    a = run.nodes["a"].transport
    garbage = os.urandom(3000)
    err = rpc_error(a.stub.Submit, iter([chunk(a.node_id, 0, garbage)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "payload rejected: payload does not start with the lowband magic" in err.details()
    # another member's frame (signed by its key): the signature says whose it is
    err = rpc_error(a.stub.Submit, iter([chunk(a.node_id, 0, run.frame("b", 0))]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"frame signed by 'b' (key id {run.nodes['b'].transport.key.key_id}) arrived as 'a''s (a swapped sender)" \
        in err.details()
    run.honest_round()


def test_oversized_payload_is_invalid_argument(run: Run) -> None:
    a = run.nodes["a"].transport
    limit = run.server.core.limit
    err = rpc_error(a.stub.Submit, iter([chunk(a.node_id, 0, b"x" * 16, total=limit + 1)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT  # no honest frame is that large: malformed, not a quota
    assert f"payload of {limit + 1} bytes exceeds this run's limit of {limit} bytes" in err.details()
    run.honest_round()


def test_wrong_round_is_failed_precondition(run: Run) -> None:
    a = run.nodes["a"].transport
    err = rpc_error(a.stub.Submit, iter([chunk(a.node_id, 3, b"x" * 64)]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "round 3 is not open yet (the open round is 0)" in err.details()
    run.honest_round()
    err = rpc_error(a.stub.Submit, iter([chunk(a.node_id, 0, b"x" * 64)]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "round 0 is closed (the open round is 1)" in err.details()
    run.honest_round()


def test_unknown_node_is_not_found(run: Run) -> None:
    ghost = "0" * 32
    t = GrpcTransport(run.server.address, rpc_timeout_s=RPC_S)  # signs properly, as a node id nobody has
    t.node_id = ghost
    try:
        for err in (rpc_error(t.stub.Submit, iter([chunk(ghost, 0, b"x" * 64)])),
                    rpc_error(t.stub.Heartbeat, pb.HeartbeatRequest(node_id=ghost)),
                    rpc_error(t.stub.Collect, pb.CollectRequest(node_id=ghost, round=0, wait_ms=0)),
                    rpc_error(t.stub.FetchState, pb.FetchStateRequest(node_id=ghost))):
            assert err.code() == grpc.StatusCode.NOT_FOUND
            assert "unknown node id 00000000…" in err.details() and "join again" in err.details()
    finally:
        t.close()
    run.honest_round()


def test_truncated_stream_is_data_loss_with_resume_offset(run: Run) -> None:
    a = run.nodes["a"].transport
    frame = run.frame("a", 0)
    err = rpc_error(a.stub.Submit, iter([chunk(a.node_id, 0, frame[:1000], total=len(frame))]))
    assert err.code() == grpc.StatusCode.DATA_LOSS
    assert f"stream ended at byte 1000 of {len(frame)}; resume from offset 1000" in err.details()
    assert trailing(err)["lowband-resume-offset"] == "1000"
    # resuming at the wrong offset is OUT_OF_RANGE naming the right one
    err = rpc_error(a.stub.Submit, iter([chunk(a.node_id, 0, frame[2000:], offset=2000, total=len(frame))]))
    assert err.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "resume from 1000" in err.details() and trailing(err)["lowband-resume-offset"] == "1000"
    # resuming from the advertised offset completes the upload
    resp = a.stub.Submit(iter([chunk(a.node_id, 0, frame[1000:], offset=1000, total=len(frame))]), timeout=RPC_S)
    assert (resp.round, resp.received_bytes, resp.accepted) == (0, len(frame), True)
    run.honest_round({"a": frame})  # a's transport resubmits: idempotent


class _CutByTheClient(grpc.RpcError):
    """What gRPC raises when the caller's own deadline cuts a stream: no word (no metadata) from the server."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return "Deadline Exceeded"

    def trailing_metadata(self) -> tuple:
        return ()


class CutOnce(grpc.StreamUnaryClientInterceptor):
    """A fault interceptor (the transport's ``interceptors`` seam): the first upload is cut after 2 of the 4 chunks
    gRPC pulled reached the coordinator, the way a deadline cuts it (no status from the server); every attempt's
    first offset and deadline are recorded."""

    def __init__(self) -> None:
        self.attempts: list[tuple[int, float]] = []

    def intercept_stream_unary(self, continuation: Any, details: grpc.ClientCallDetails,
                               chunks: Iterator[pb.SubmitChunk]) -> Any:
        first = next(chunks)
        self.attempts.append((first.offset, details.timeout))
        if len(self.attempts) > 1:
            return continuation(details, iter([first, *chunks]))
        pulled = [first, next(chunks), next(chunks), next(chunks)]  # gRPC pulled 4 chunks; 2 arrived
        with pytest.raises(grpc.RpcError):
            continuation(details, iter(pulled[:2])).result()
        raise _CutByTheClient()


def test_an_upload_cut_by_its_own_deadline_goes_on_where_it_left_off(run: Run,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A large payload on a slow uplink: the deadline grows with the bytes left, and an attempt cut on the client
    side resumes from its last chunk (the coordinator corrects the offset) instead of restarting at byte 0."""
    from node.transport import grpc_client

    monkeypatch.setattr(grpc_client, "CHUNK", 4096)
    cut = CutOnce()
    a = run.nodes["a"].transport
    t = GrpcTransport(run.server.address, rpc_timeout_s=RPC_S, key=a.key, interceptors=[cut])
    t.node_id, t.identity = a.node_id, a.identity  # the same member, through a channel with the fault
    try:
        frame = run.frame("a", 0)
        assert t.submit(0, frame, loss=2.0) == "accepted"
    finally:
        t.close()
    (start0, deadline0), (start1, _), *more = cut.attempts
    assert start0 == 0 and deadline0 == pytest.approx(RPC_S + grpc_client.UPLOAD_SLOT_WAIT_S
                                                     + len(frame) * 8 / grpc_client.MIN_UPLOAD_BPS)
    # the retry began at the 4th chunk; the coordinator held 2, named that offset, and the upload went on from it
    assert (start1, [m[0] for m in more]) == (3 * 4096, [2 * 4096]), cut.attempts
    run.honest_round({"a": frame})


def signed_join(run: Run, name: str, key: NodeKey, **kw: Any) -> pb.JoinRequest:
    """A Join as a node with ``key`` makes it, signed now; ``kw`` overrides fields."""
    ts = int(time.time() * 1000)
    fields: dict[str, Any] = dict(node_name=name, protocol_version=PROTOCOL_VERSION,
                                  config_json=run.info.config_json,
                                  config_hash=run.info.config_hash, task_fingerprint=run.info.task_fingerprint,
                                  model_digest=run.info.model_digest, public_key=key.public, timestamp_ms=ts,
                                  signature=key.sign(join_message(run.info.run_id, name, key.public, ts)))
    fields.update(kw)
    return pb.JoinRequest(**fields)


def test_refused_join_is_failed_precondition_naming_the_field(run: Run) -> None:
    theirs = json.loads(run.info.config_json)
    theirs["recipe"]["H"] = 4
    err = rpc_error(run.stub.Join, signed_join(run, "mallory", NodeKey.generate(), config_json=json.dumps(theirs)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "this node differs from the run (node vs run): config recipe.H: 4 vs 1" in err.details()
    # a name bound to another key (the first that joined under it) is ALREADY_EXISTS; a wrong protocol
    # FAILED_PRECONDITION
    err = rpc_error(run.stub.Join, signed_join(run, "a", NodeKey.generate()))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "the name 'a' is bound to key" in err.details()
    err = rpc_error(run.stub.Join, signed_join(run, "a", NodeKey.generate(), protocol_version=9))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "protocol version 9 is not supported" in err.details()
    s = run.stub.Status(pb.StatusRequest(), timeout=RPC_S)
    assert sorted(m.name for m in s.members) == ["a", "b"]
    run.honest_round()


def test_collect_on_an_open_round_and_without_payload(run: Run) -> None:
    a, b = run.nodes["a"].transport, run.nodes["b"].transport
    frame = run.frame("a", 0)
    assert a.submit(0, frame) == "accepted"
    err = rpc_error(a.stub.Collect, pb.CollectRequest(node_id=a.node_id, round=0, wait_ms=0, submitted=True))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "round 0 is still open" in err.details()
    err = rpc_error(b.stub.Collect, pb.CollectRequest(node_id=b.node_id, round=0, wait_ms=0, submitted=True))
    assert err.code() == grpc.StatusCode.ABORTED  # submit again, then collect
    assert "no payload from b for round 0 is held" in err.details()
    assert trailing(err)["lowband-not-submitted"] == "1"
    run.honest_round({"a": frame})


def test_state_prefetch_before_join(run: Run) -> None:
    """A node that has not joined downloads the state (node/transport/state_prefetch.py): nothing while the run is
    at its seeded start, the committed state afterwards; on this open run no join token is asked for."""
    never = threading.Event()
    early = StatePrefetch(run.server.address)
    assert early.take(never) is None  # round 0: every node builds that state from the seed
    run.honest_round()
    state = StatePrefetch(run.server.address).take(never)
    assert state is not None
    committed, blob, fingerprint = state.committed, state.blob, state.fingerprint
    assert committed == 1 and fingerprint == run.server.core.reference.fingerprint()
    # the coordinator serves a snapshot file (coordinator/snapshot.py lays tensors out in its own order): the same
    # tensors and header as the live state, not necessarily the same bytes
    served, live = safetensors.torch.load(blob), safetensors.torch.load(run.server.core.reference.to_bytes())
    assert served.keys() == live.keys() and all(torch.equal(served[k], live[k]) for k in live)
    run.honest_round()  # the service kept serving its members
