"""A TLS mismatch shows up in gRPC only as an unreachable coordinator ("Socket closed" during the handshake): the node's
retry warning and ``lowband status`` name the flags to check."""
from __future__ import annotations

import grpc

from node.transport.grpc_auth import ClientTls
from node.transport.grpc_client import tls_hint


class _Err(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


CLOSED = _Err(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: UNAVAILABLE: "
                                           "ipv4:127.0.0.1:7070: Socket closed")


def test_a_closed_handshake_names_the_tls_flags() -> None:
    assert "pass --tls-ca" in tls_hint(CLOSED, None)
    assert "pass --tls-cert/--tls-key" in tls_hint(CLOSED, ClientTls(ca=b"ca"))
    assert tls_hint(CLOSED, ClientTls(ca=b"ca", cert=b"c", key=b"k")) == ""


def test_other_failures_get_no_hint() -> None:
    refused = _Err(grpc.StatusCode.UNAVAILABLE, "ipv4:127.0.0.1:7070: Failed to connect to remote host: Connection "
                                                "refused")
    assert tls_hint(refused, None) == ""
    assert tls_hint(_Err(grpc.StatusCode.UNAUTHENTICATED, "Socket closed"), None) == ""
