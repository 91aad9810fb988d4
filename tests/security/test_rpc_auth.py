"""Credentials and identity over real gRPC: a node id captured on the wire is useless from another connection (no
signature, a signature by another key, a replay of the exact call, a stale timestamp are all UNAUTHENTICATED); Join
is signed by the node's key; the same key takes its place back at once; GetRun and Status need the read or join
token when the run has one, and Status shows no credential material."""
from __future__ import annotations

import time
from typing import Callable

import grpc
import pytest

from coordinator.core import PROTOCOL_VERSION
from node.identity import NodeKey
from node.proto.lowband.v1 import coordinator_pb2 as pb
from node.transport.control import JoinRefused
from node.transport.grpc_auth import join_message
from security_harness import RPC_S, Trial, rpc_error, signed_metadata


def test_a_captured_node_id_is_useless_from_another_connection(trial: Callable[..., Trial]) -> None:
    t = trial()
    a, _ = t.join("a"), t.join("b")
    node_id, key = a.transport.node_id, a.transport.key
    stub = t.stub()  # the attacker's own connection
    hb = pb.HeartbeatRequest(node_id=node_id)
    # what a sent, exactly as it crossed the wire (metadata and request), accepted once
    captured = signed_metadata(key, node_id, "Heartbeat", request=hb)
    assert stub.Heartbeat(hb, metadata=captured, timeout=RPC_S).current_round == 0
    cases = {
        "no signature": ([], "must be signed by the node's key"),
        "signed by another key": (signed_metadata(NodeKey.generate(), node_id, "Heartbeat", request=hb),
                                  "request signature does not verify with the key of node " + key.key_id),
        "a replay of the captured call": (captured, "replayed request"),
        "the captured signature on another request": (
            captured, "request signature does not verify"),
        "a stale timestamp": (signed_metadata(key, node_id, "Heartbeat", request=hb, wall=time.time() - 3600),
                              "off the coordinator's clock (allowed ±60 s)"),
    }
    for what, (md, message) in cases.items():
        request = pb.HeartbeatRequest(node_id=node_id) if what != "the captured signature on another request" else \
            pb.LeaveRequest(node_id=node_id, reason="bye")
        call = stub.Leave if isinstance(request, pb.LeaveRequest) else stub.Heartbeat
        err = rpc_error(call, request, metadata=md)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, what
        assert message in err.details(), (what, err.details())
    # an upload and a download in a's name, signed by another key, and a's signature over another round
    chunk = pb.SubmitChunk(node_id=node_id, round=0, offset=0, total_size=3, data=b"abc")
    err = rpc_error(stub.Submit, iter([chunk]), metadata=signed_metadata(NodeKey.generate(), node_id, "Submit",
                                                                          submit=(0, 3)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    err = rpc_error(stub.Submit, iter([chunk]), metadata=signed_metadata(key, node_id, "Submit", submit=(5, 3)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "are not the signed ones (5, 3)" in err.details()
    err = rpc_error(stub.FetchState, pb.FetchStateRequest(node_id=node_id),
                    metadata=signed_metadata(NodeKey.generate(), node_id, "FetchState",
                                             request=pb.FetchStateRequest(node_id=node_id)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    # a's own signature naming b's session in the request: refused
    other = pb.HeartbeatRequest(node_id=t.members["b"].transport.node_id)
    err = rpc_error(stub.Heartbeat, other, metadata=signed_metadata(key, node_id, "Heartbeat", request=other))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "another node id" in err.details()
    assert sorted(m.name for m in t.core.status()["members"]) == ["a", "b"]  # nobody left in a's name
    assert t.honest_round() == 0


def test_join_is_signed_by_the_node_key_and_cannot_be_replayed(trial: Callable[..., Trial]) -> None:
    t = trial()
    key, i = NodeKey.generate(), t.info
    ts = int(time.time() * 1000)

    def join(name: str, signature: bytes, ts: int = ts) -> pb.JoinRequest:
        return pb.JoinRequest(node_name=name, protocol_version=PROTOCOL_VERSION, config_json=i.config_json,
                              config_hash=i.config_hash, task_fingerprint=i.task_fingerprint, model_digest=i.model_digest,
                              public_key=key.public, signature=signature, timestamp_ms=ts)

    good = key.sign(join_message("security", "a", key.public, ts))
    err = rpc_error(t.stub().Join, join("mallory", good))  # a's signature does not cover another name
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "join signature does not verify" in err.details()
    assert t.stub().Join(join("a", good), timeout=RPC_S).first_round == 0
    err = rpc_error(t.stub().Join, join("a", good))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "replayed Join" in err.details()
    old = ts - 120_000
    err = rpc_error(t.stub().Join, join("a", key.sign(join_message("security", "a", key.public, old)), old))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "join timestamp is -120 s off" in err.details()


def test_the_same_node_restarted_takes_its_place_back_and_another_key_cannot(trial: Callable[..., Trial]) -> None:
    t = trial()
    a, _ = t.join("a"), t.join("b")
    assert t.honest_round() == 0
    old = a.transport
    with pytest.raises(JoinRefused, match="ALREADY_EXISTS: the name 'a' is bound to key "):
        t.join("a", NodeKey.generate())
    again = t.join("a", old.key)  # kill -9 and restart with the same workdir: the same key
    assert again.transport.join_response.replaced and again.transport.node_id != old.node_id
    err = rpc_error(old.stub.Heartbeat, pb.HeartbeatRequest(node_id=old.node_id))
    assert err.code() == grpc.StatusCode.NOT_FOUND  # the old session ended at once
    again.worker = a.worker  # the restarted process resumed from its checkpoint
    assert t.honest_round() == 1


def test_status_and_get_run_need_a_token_when_the_run_has_one_and_show_no_credentials(
        trial: Callable[..., Trial]) -> None:
    t = trial(membership={"join_token": "join-s3cret", "read_token": "read-s3cret"})
    t.join("a"), t.join("b")
    stub = t.stub()
    for call, request in ((stub.Status, pb.StatusRequest()),
                          (stub.GetRun, pb.GetRunRequest(protocol_version=PROTOCOL_VERSION)),
                          (stub.Status, pb.StatusRequest(read_token="wrong"))):
        err = rpc_error(call, request)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "needs its read token" in err.details()
    for token in ("read-s3cret", "join-s3cret"):
        s = stub.Status(pb.StatusRequest(read_token=token), timeout=RPC_S)
        assert sorted(m.name for m in s.members) == ["a", "b"]
        assert stub.GetRun(pb.GetRunRequest(protocol_version=PROTOCOL_VERSION, read_token=token), timeout=RPC_S).run_id
    wire = s.SerializeToString()
    for secret in ("join-s3cret", "read-s3cret", *(m.transport.node_id for m in t.members.values()),
                   *(m.transport.node_id[:8] for m in t.members.values())):
        assert secret.encode() not in wire
    assert {m.key_id for m in s.members} == {m.transport.key.key_id for m in t.members.values()}


def test_a_node_without_the_join_token_is_refused_in_one_line_naming_the_flag(trial: Callable[..., Trial]) -> None:
    import threading

    from node.transport.grpc_control import GrpcControl

    t = trial(membership={"join_token": "join-s3cret"})
    plane = GrpcControl(t.address, threading.Event(), key=NodeKey.generate())  # no token: GetRun is refused
    with pytest.raises(JoinRefused, match=r"UNAUTHENTICATED: .*pass --join-token TOKEN or set \$LOWBAND_JOIN_TOKEN"):
        plane.get_run_config()
    assert GrpcControl(t.address, threading.Event(), key=NodeKey.generate(),
                       token="join-s3cret").get_run_config().run_id == "security"
