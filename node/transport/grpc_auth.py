"""How a node proves who it is to the coordinator, and how its channel is secured.

- ``join_message`` / ``rpc_message``: what the node's key signs (the coordinator rebuilds the same bytes to verify;
  coordinator/guard.py). The encoding is ``node.identity.signed_message``, so each signature is tagged with its
  domain ("lowband/join/v1", "lowband/rpc/v1").
- ``SigningInterceptor``: one client interceptor that signs every call a member makes after Join (and a FetchState
  before Join, with the key itself in the metadata), over the exact serialized request.
- ``ClientTls`` and ``open_channel``: TLS through grpc's own ``ssl_channel_credentials`` (server authentication by a
  CA file or the system roots; optionally a client certificate for mutual TLS), or plaintext, plus any extra client
  interceptors (tests inject faults there).

Only gRPC, the generated messages and node.identity are imported: state_prefetch runs this before torch loads.
"""
from __future__ import annotations

import hashlib
import ipaddress
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import grpc
import msgpack

from node.errors import ConfigError
from node.identity import NodeKey, signed_message

JOIN_DOMAIN = "lowband/join/v1"
RPC_DOMAIN = "lowband/rpc/v1"
SERVICE = "/lowband.v1.Coordinator/"
#: calls a member signs; FetchState is also signed before Join (with the key in MD_KEY)
SIGNED_METHODS = frozenset(SERVICE + m for m in ("Heartbeat", "Leave", "Submit", "Collect", "FetchState"))
MD_NODE, MD_TS, MD_NONCE, MD_SIG, MD_KEY, MD_SUBMIT = ("lowband-node-id", "lowband-ts", "lowband-nonce",
                                                       "lowband-sig-bin", "lowband-key-bin", "lowband-submit")
NONCE_HEX = 16
#: initial metadata of a Submit: the upload holds a slot and may send its chunks (JoinResponse.upload_go)
UPLOAD_GO = ("lowband-upload", "go")


def join_message(run_id: str, name: str, public: bytes, timestamp_ms: int) -> bytes:
    return signed_message(JOIN_DOMAIN, run_id, name, public, timestamp_ms)


def submit_digest(round_: int, total_size: int) -> bytes:
    """What a Submit's signature covers of its payload: the first chunk's round and total size (the chunks
    themselves arrive later; the frame inside carries its own digest)."""
    return hashlib.sha256(msgpack.packb([round_, total_size])).digest()


def request_digest(serialized: bytes) -> bytes:
    return hashlib.sha256(serialized).digest()


def rpc_message(method: str, node_id: str, ts_ms: int, nonce: str, digest: bytes) -> bytes:
    return signed_message(RPC_DOMAIN, method, node_id, ts_ms, nonce, digest)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name, brackets allowed) is this machine's loopback: 127.0.0.0/8, ::1 or
    localhost. Unspecified addresses (0.0.0.0, ::) and other names are not."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) → (host, port); raises ConfigError naming the address when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{address!r} is not HOST:PORT")
    return host, int(port)


class SigningInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                         grpc.StreamUnaryClientInterceptor):
    """Signs the calls in ``SIGNED_METHODS`` with ``key`` for the node id the request itself names (its first chunk's
    for Submit; empty before Join: then a FetchState carries the public key and is signed by it). Other calls pass
    untouched. ``wall``: unix time in seconds, for the signed timestamp."""

    def __init__(self, key: NodeKey, wall: Callable[[], float] = time.time) -> None:
        self.key, self.wall = key, wall

    def _metadata(self, details: grpc.ClientCallDetails, node_id: str, digest: bytes,
                  extra: Sequence[tuple[str, Any]] = ()) -> Any:
        method = details.method if isinstance(details.method, str) else details.method.decode()
        ts, nonce = int(self.wall() * 1000), secrets.token_hex(NONCE_HEX // 2)
        sig = self.key.sign(rpc_message(method, node_id, ts, nonce, digest))
        md = [*(details.metadata or ()), (MD_NODE, node_id), (MD_TS, str(ts)), (MD_NONCE, nonce), (MD_SIG, sig),
              *extra]
        if not node_id:
            md.append((MD_KEY, self.key.public))
        return _Details(details.method, details.timeout, tuple(md), details.credentials, details.wait_for_ready,
                        details.compression)

    def _signed(self, details: grpc.ClientCallDetails) -> bool:
        method = details.method if isinstance(details.method, str) else details.method.decode()
        return method in SIGNED_METHODS

    def intercept_unary_unary(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        if self._signed(details):
            details = self._metadata(details, request.node_id, request_digest(request.SerializeToString()))
        return continuation(details, request)

    def intercept_unary_stream(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        if self._signed(details):
            details = self._metadata(details, request.node_id, request_digest(request.SerializeToString()))
        return continuation(details, request)

    def intercept_stream_unary(self, continuation: Any, details: grpc.ClientCallDetails,
                               request_iterator: Iterator[Any]) -> Any:
        if not self._signed(details):
            return continuation(details, request_iterator)
        first = next(request_iterator, None)  # the first chunk names round and total size: they are signed
        if first is None:
            return continuation(details, iter(()))
        details = self._metadata(details, first.node_id, submit_digest(first.round, first.total_size),
                                 [(MD_SUBMIT, f"{first.round}:{first.total_size}")])
        return continuation(details, _chain(first, request_iterator))


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


@dataclass(frozen=True)
class _Details(grpc.ClientCallDetails):
    method: Any
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


@dataclass(frozen=True)
class ClientTls:
    """Server authentication by ``ca`` (PEM bytes; None: the system's roots), and for mutual TLS this node's
    certificate chain and its private key (PEM). ``server_name``: the name to check the server certificate
    against when it differs from the address's host."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str = ""

    @classmethod
    def from_files(cls, ca: str | None, cert: str | None = None, key: str | None = None,
                   server_name: str = "") -> "ClientTls":
        """Raises ConfigError naming the file that cannot be read, or when only one of cert/key is given."""
        if bool(cert) != bool(key):
            raise ConfigError("mutual TLS needs both --tls-cert and --tls-key")
        return cls(_read(ca, "--tls-ca"), _read(cert, "--tls-cert"), _read(key, "--tls-key"), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)


def _read(path: str | None, flag: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path}: {exc}") from None


def check_plaintext(address: str, tls: ClientTls | None, insecure: bool) -> None:
    """Refuse (ConfigError) to send credentials in clear to a coordinator that is not on this machine."""
    host, _ = split_address(address)
    if tls is None and not insecure and not is_loopback(host):
        raise ConfigError(f"refusing to talk to {address} without TLS: the join token and this node's frames would "
                          "cross the network in clear. Give --tls-ca CA.pem (or --tls for a certificate from a public "
                          "CA), or --insecure to do it anyway (only inside a VPN or a private network)")


def open_channel(address: str, tls: ClientTls | None, options: Sequence[tuple[str, Any]],
                 interceptors: Sequence[grpc.ClientInterceptor] = ()) -> tuple[grpc.Channel, grpc.Channel]:
    """(the raw channel to close, the channel to call through ``interceptors``, first one outermost)."""
    opts = list(options)
    if tls is None:
        raw = grpc.insecure_channel(address, options=opts)
    else:
        if tls.server_name:
            opts.append(("grpc.ssl_target_name_override", tls.server_name))
        raw = grpc.secure_channel(address, tls.credentials(), options=opts)
    return raw, grpc.intercept_channel(raw, *interceptors) if interceptors else raw
