"""TLS on the coordinator's port, over real gRPC on 127.0.0.1 with generated certificates: the handshake with the
right CA works and rounds commit; a wrong CA and a plaintext client are refused; with mutual TLS the client
certificate is the node's identity (it must name the key that signs the node's Join and calls); listening off
loopback without TLS is refused unless --insecure, and then a join token is generated and kept."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import grpc
import pytest

from coordinator.core import PROTOCOL_VERSION
from coordinator.errors import StartupError
from coordinator.server import CoordinatorServer
from node.errors import ConfigError
from node.identity import NodeKey
from node.proto.lowband.v1 import coordinator_pb2 as pb
from node.transport.control import JoinRefused
from node.transport.grpc_auth import check_plaintext
from security_harness import RPC_S, Pki, Trial, rpc_error, run_text


def test_a_node_with_the_right_ca_joins_and_rounds_commit_over_tls(pki: Pki, trial: Callable[..., Trial]) -> None:
    t = trial(tls=pki.server_tls(), client_tls=pki.client_tls())
    t.join("a"), t.join("b")
    assert t.honest_round() == 0 and t.honest_round() == 1
    assert t.server.tls is not None


def test_a_wrong_ca_and_a_plaintext_client_are_refused(pki: Pki, trial: Callable[..., Trial]) -> None:
    t = trial(tls=pki.server_tls(), client_tls=pki.client_tls())
    wrong = t.stub(pki.client_tls(ca=pki.wrong_ca))
    err = rpc_error(wrong.GetRun, pb.GetRunRequest(protocol_version=PROTOCOL_VERSION))
    assert err.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails: the server's certificate is not trusted
    plain = t.stub()  # the default of this trial is TLS: make a plaintext one by hand
    import grpc as _grpc

    ch = _grpc.insecure_channel(t.address)
    try:
        from node.proto.lowband.v1 import coordinator_pb2_grpc as pb_grpc

        err = rpc_error(pb_grpc.CoordinatorStub(ch).GetRun, pb.GetRunRequest(protocol_version=PROTOCOL_VERSION))
        assert err.code() == grpc.StatusCode.UNAVAILABLE  # a TLS port does not speak plaintext HTTP/2
    finally:
        ch.close()
    assert plain.GetRun(pb.GetRunRequest(protocol_version=PROTOCOL_VERSION), timeout=RPC_S).run_id == "security"  # right CA: fine


def test_mutual_tls_binds_a_member_to_the_key_its_certificate_names(pki: Pki, trial: Callable[..., Trial],
                                                                   tmp_path: Path) -> None:
    t = trial(tls=pki.server_tls(client_ca=True), client_tls=pki.client_tls())
    keys = {n: NodeKey.generate() for n in ("a", "b", "mallory")}
    certs = {n: pki.node_cert(tmp_path / n, k) for n, k in keys.items()}
    for n in ("a", "b"):
        t.join(n, keys[n], pki.client_tls(certs[n]))
    assert t.honest_round() == 0
    # no client certificate at all: the handshake is refused
    err = rpc_error(t.stub(pki.client_tls()).GetRun, pb.GetRunRequest(protocol_version=PROTOCOL_VERSION))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    # mallory's valid certificate names mallory's key: a Join signed with another key is refused
    with pytest.raises(JoinRefused, match="certificate names .*, the Join .*lowband certs"):
        t.join("m2", NodeKey.generate(), pki.client_tls(certs["mallory"]))
    # a's key (stolen, say) over mallory's TLS connection: every call of a's session is refused
    thief = t.transport(keys["a"], pki.client_tls(certs["mallory"]))
    thief.node_id, thief.identity = t.members["a"].transport.node_id, t.members["a"].transport.identity
    err = rpc_error(thief.stub.Heartbeat, pb.HeartbeatRequest(node_id=thief.node_id))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "TLS client certificate does not name this member's key" in err.details()
    assert t.honest_round() == 1  # a and b go on


def test_listening_off_loopback_needs_tls_or_insecure_and_then_a_join_token(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "run.toml").write_text(run_text())
    with pytest.raises(StartupError, match="refusing to listen on 0.0.0.0 without TLS.*--insecure"):
        CoordinatorServer("0.0.0.0:0", tmp_path / "state", tmp_path / "run.toml")
    tokens = []
    for kw in ({"insecure": True}, {"tls": pki.server_tls()}):  # the second start reuses the state dir's token
        server = CoordinatorServer("0.0.0.0:0", tmp_path / "state", tmp_path / "run.toml", **kw)
        server.start()
        try:
            tokens.append(server.generated_token)
            assert server.core.cfg.membership.join_token == server.generated_token
        finally:
            server.stop(grace=0)
    assert tokens[0] and tokens[0] == tokens[1] == (tmp_path / "state" / "join_token").read_text().strip()
    assert (tmp_path / "state" / "join_token").stat().st_mode & 0o077 == 0


def test_a_node_refuses_to_send_its_credentials_in_clear_off_loopback() -> None:
    check_plaintext("127.0.0.1:7070", None, insecure=False)
    check_plaintext("localhost:7070", None, insecure=False)
    check_plaintext("[::1]:7070", None, insecure=False)
    with pytest.raises(ConfigError, match="refusing to talk to coordinator.example.org:7070 without TLS"):
        check_plaintext("coordinator.example.org:7070", None, insecure=False)
    check_plaintext("10.0.0.5:7070", None, insecure=True)
