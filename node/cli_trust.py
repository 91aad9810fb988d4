"""The command-line pieces of the coordinator's trust settings (docs/security.md), used by node/cli.py: the
coordinator's TLS, token and limit flags, the client TLS flags of ``lowband node`` and ``lowband status``, and
``lowband certs``. Imports nothing heavy at module level: ``lowband node`` parses these before torch loads."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def add_coordinator_args(co: argparse.ArgumentParser) -> None:
    co.add_argument("--tls-cert", default=None, help="server certificate chain (PEM); TLS is required off loopback")
    co.add_argument("--tls-key", default=None, help="the certificate's private key (PEM)")
    co.add_argument("--tls-client-ca", default=None, help="mutual TLS: only nodes with a certificate from this CA, "
                    "naming their node key (`lowband certs --node`), may connect")
    co.add_argument("--insecure", action="store_true", help="listen off loopback without TLS (only inside a VPN or "
                    "a private network: everything, join token included, crosses it in clear)")
    co.add_argument("--join-token", default=None, help="the run's join token instead of the run file's (or "
                    "$LOWBAND_JOIN_TOKEN); off loopback one is generated into the state dir when neither is set")
    co.add_argument("--max-rpcs-per-node", type=int, default=4, help="concurrent calls of one member")
    co.add_argument("--max-rpcs-per-address", type=int, default=64, help="concurrent calls from one IP address "
                    "(raise it for many nodes behind one NAT)")
    co.add_argument("--max-rpcs-before-join", type=int, default=16, help="concurrent calls of nodes that have not "
                    "joined, in all")
    co.add_argument("--max-downloads-before-join", type=int, default=8, help="concurrent state downloads of nodes "
                    "that have not joined yet, in all")
    co.add_argument("--idle-stream-s", type=float, default=30.0, help="cancel an upload or download that moves "
                    "nothing this many seconds")
    co.add_argument("--upload-memory-mib", type=float, default=32.0, help="frames read and validated at once, in "
                    "MiB (at least 4 uploads; each costs about five times its frame while it arrives and is checked): "
                    "uploads beyond it wait for a slot, so the coordinator's memory does not grow with the number of "
                    "members; 0: no bound")
    co.add_argument("--upload-read-ahead-kib", type=int, default=0, help="bytes gRPC may buffer of an upload that "
                    "waits for a slot, in KiB; 0 (default): gRPC sizes its windows from each link's bandwidth-delay "
                    "product, which high-latency links need for full speed (a waiting upload then costs up to that "
                    "window); N: at most about N KiB per waiting upload, and links whose bandwidth × RTT exceeds it "
                    "upload below their rate (docs/security.md)")
    co.add_argument("--forget-name", action="append", default=[], metavar="NAME",
                    help="free NAME before serving (repeatable): a name is bound to the first key that joined under "
                         "it, for the whole run; free it for a node that lost its key file (an evicted key stays "
                         "refused, and so does an evicted name)")


def cmd_coordinator(args: argparse.Namespace) -> int:
    """``lowband coordinator``: serve until SIGTERM; a start-up error is one line on stderr and exit 2."""
    from coordinator.torch_threads import apply_torch_threads

    apply_torch_threads(args.torch_threads)  # first: before any torch work sizes the pools
    from coordinator.errors import StartupError
    from coordinator.guard import ServerLimits
    from coordinator.server import serve
    from coordinator.startup import ServerTls

    try:
        limits = ServerLimits(per_member_rpcs=args.max_rpcs_per_node, per_peer_rpcs=args.max_rpcs_per_address,
                              anonymous_rpcs=args.max_rpcs_before_join, idle_stream_s=args.idle_stream_s,
                              prejoin_downloads=args.max_downloads_before_join,
                              upload_bytes=int(args.upload_memory_mib * (1 << 20)),
                              upload_read_ahead=args.upload_read_ahead_kib << 10)
        return serve(args.listen, args.state_dir, args.run, limits=limits, insecure=args.insecure,
                     tls=ServerTls.from_files(args.tls_cert, args.tls_key, args.tls_client_ca),
                     join_token=args.join_token or os.environ.get("LOWBAND_JOIN_TOKEN", ""),
                     http=_http_address(args.listen, args.http_host, args.http_port),
                     metrics=_http_address(args.listen, args.metrics_host, args.metrics_port),
                     forget_names=args.forget_name)
    except StartupError as exc:
        print(f"lowband coordinator: cannot start: {exc}", file=sys.stderr)
        return 2


def _http_address(listen: str, host: str | None, port: int | None) -> str | None:
    """``--http-port``/``--metrics-port`` with their host (default: the gRPC --listen host) as HOST:PORT."""
    if port is None:
        return None
    from node.transport.grpc_auth import split_address

    return f"{host if host is not None else split_address(listen)[0]}:{port}"


def add_certs_parser(sub: Any) -> None:
    ce = sub.add_parser("certs", help="a CA, a coordinator certificate and node certificates for a test deployment")
    ce.add_argument("--dir", required=True, help="where the CA (made once) and the server certificate go")
    ce.add_argument("--host", action="append", default=[], help="a name or address nodes dial the coordinator at "
                    "(repeatable): makes DIR/server.pem + DIR/server.key")
    ce.add_argument("--node", action="append", default=[], metavar="WORKDIR", help="a node's workdir (repeatable): "
                    "makes WORKDIR/tls.pem + WORKDIR/tls.key naming the key in WORKDIR/node.key (created if missing)")
    ce.add_argument("--days", type=int, default=365, help="validity of the server and node certificates, in days")
    ce.set_defaults(func=cmd_certs)


def cmd_certs(args: argparse.Namespace) -> int:
    from node.certs import make_certs

    for line in make_certs(args.dir, args.host, args.node, days=args.days):
        print(line)
    return 0


def add_client_tls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-ca", default=None, help="CA certificate (PEM) that issued the coordinator's certificate")
    p.add_argument("--tls", action="store_true", help="TLS with the system's CA roots (a publicly trusted "
                   "coordinator certificate)")
    p.add_argument("--tls-cert", default=None, help="mutual TLS: this node's certificate (`lowband certs --node`)")
    p.add_argument("--tls-key", default=None, help="mutual TLS: the certificate's private key")
    p.add_argument("--tls-server-name", default=None, help="the name to check the coordinator's certificate "
                   "against, when it is not the host of the address dialled")
    p.add_argument("--insecure", action="store_true", help="talk to a coordinator off loopback without TLS (only "
                   "inside a VPN or a private network: the join token and frames then cross it in clear)")


def client_tls(args: argparse.Namespace, address: str) -> Any:
    """The ``ClientTls`` from --tls/--tls-ca/--tls-cert/--tls-key (None: plaintext); raises ConfigError for plaintext
    to a coordinator off loopback without --insecure, or a TLS file that cannot be read."""
    from node.transport.grpc_auth import ClientTls, check_plaintext

    tls = None
    if args.tls or args.tls_ca or args.tls_cert:
        tls = ClientTls.from_files(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name or "")
    check_plaintext(address, tls, args.insecure)
    return tls


def node_security(args: argparse.Namespace) -> Any:
    """``lowband node``'s checks before anything starts: a valid --name, and the coordinator channel's TLS (None for
    plaintext or DHT mode). Raises ConfigError naming the problem."""
    if args.name:
        from node.membership import check_node_name

        problem = check_node_name(args.name)
        if problem:
            from node.errors import ConfigError

            raise ConfigError(f"--name: {problem}")
    return client_tls(args, args.coordinator) if args.coordinator else None


def node_exit_code(exc: BaseException) -> int | None:
    """The exit status (after one line on stderr) for how a node's run ended: 4 when the coordinator kept failing
    (INTERNAL/UNKNOWN), 3 when a Join was refused after the first one; None for anything else (re-raised)."""
    from node.transport.control import JoinRefused
    from node.transport.grpc_client import CoordinatorFault

    if isinstance(exc, CoordinatorFault):
        print(f"lowband node: giving up: {exc}", file=sys.stderr)
        return 4
    if isinstance(exc, JoinRefused):  # refused when joining again (the first refusal is the daemon's exit 3)
        print(f"lowband node: join refused: {exc}", file=sys.stderr)
        return 3
    return None


def read_token(args: argparse.Namespace) -> str:
    """``lowband status``'s token: --read-token, else $LOWBAND_READ_TOKEN, else $LOWBAND_JOIN_TOKEN."""
    return args.read_token or os.environ.get("LOWBAND_READ_TOKEN", "") or os.environ.get("LOWBAND_JOIN_TOKEN", "")
