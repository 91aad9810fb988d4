"""What a coordinator settles before it serves: the state dir's lock, the port it listens on, whether its exposure is
safe (TLS off loopback), and the join token. Each failure is a ``StartupError`` with one line that says what to do.

- **Lock.** ``state_dir/lock`` is held (flock) for the process's life: a second coordinator on the same state dir is
  refused, naming the first one's pid — two writers of one run would be a split brain.
- **Port memory.** ``state_dir/listen.json`` records the ports bound last (gRPC, dashboard, metrics); port 0 binds
  the remembered one again, so nodes (and bookmarks, and Prometheus) find a restarted coordinator where it was.
  gRPC's SO_REUSEPORT is off: a busy port is refused.
- **Exposure.** Listening on anything but loopback needs TLS (``--tls-cert``/``--tls-key``) unless ``--insecure``;
  so do the dashboard and the metrics (served over HTTPS with the same certificate).
- **Join token.** A run that listens off loopback needs one: the run file's, or one generated once, kept in
  ``state_dir/join_token`` (mode 0600) and printed.
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import json
import logging
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc

from coordinator.errors import StartupError
from node.fsutil import write_atomic
from node.runfile import RunFile
from node.transport.grpc_auth import is_loopback

log = logging.getLogger(__name__)
PORT_FILE, TOKEN_FILE, LOCK_FILE = "listen.json", "join_token", "lock"


class StateDirLock:
    """An exclusive lock on ``state_dir`` (created if missing); raises StartupError when another process holds it or
    the directory cannot be used."""

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StartupError(f"cannot use state dir {self.dir}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise StartupError(f"state dir {self.dir} is in use by another coordinator (pid {holder}); one state "
                                   "dir serves one coordinator") from None
            raise StartupError(f"cannot lock state dir {self.dir}: {exc.strerror or exc}") from None
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # a read-only state dir: the Store refuses it with the reason next
        self._held = True

    def release(self) -> None:
        if getattr(self, "_held", False):
            self._held = False
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)


def remembered_port(state_dir: Path, key: str = "port") -> int | None:
    """The port recorded under ``key`` (``port``: gRPC; ``http_port``, ``metrics_port``), or None."""
    try:
        port = int(json.loads((state_dir / PORT_FILE).read_text())[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return port if 0 < port < 65536 else None


def remember_port(state_dir: Path, port: int, key: str = "port") -> None:
    """Record ``port`` under ``key``, keeping the other ports recorded."""
    path = state_dir / PORT_FILE
    try:
        ports = json.loads(path.read_text())
        if not isinstance(ports, dict):
            ports = {}
    except (OSError, ValueError):
        ports = {}
    ports[key] = port
    try:
        write_atomic(path, json.dumps(ports))
    except OSError as exc:
        log.warning("cannot record the port in %s: %s (a restart with port 0 may pick another)", state_dir, exc)


def pick_port(state_dir: Path, port: int, key: str, what: str) -> tuple[int, str]:
    """``port``, or for 0 the one remembered under ``key`` (then also why, for a refusal's message)."""
    if port:
        return port, ""
    again = remembered_port(state_dir, key) or 0
    return again, (f" ({what}'s port before, remembered in {state_dir / PORT_FILE}; give another port to move it)"
                   if again else "")


def check_port_free(host: str, port: int, why: str) -> None:
    """Bind ``host:port`` once to see that it is free (gRPC's own failure is a log line and a bare RuntimeError)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]") or "0.0.0.0", port))
        except OSError as exc:
            raise StartupError(f"cannot listen on {host}:{port}{why}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class ServerTls:
    """The server's certificate chain and key (PEM), and with ``client_ca`` mutual TLS: every client must present a
    certificate that CA issued (and, for a node, naming its key: coordinator/guard.py)."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None

    @classmethod
    def from_files(cls, cert: str | None, key: str | None, client_ca: str | None = None) -> "ServerTls | None":
        if not cert and not key:
            if client_ca:
                raise StartupError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS)")
            return None
        if not cert or not key:
            raise StartupError("TLS needs both --tls-cert and --tls-key")
        return cls(_read(cert, "--tls-cert"), _read(key, "--tls-key"), _read(client_ca, "--tls-client-ca")
                   if client_ca else None)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None


def check_exposure(host: str, tls: ServerTls | None, insecure: bool) -> None:
    if tls is None and not insecure and not is_loopback(host):
        raise StartupError(f"refusing to listen on {host or '*'} without TLS: join tokens, node frames and the run's "
                           "state would cross the network in clear. Give --tls-cert and --tls-key (`lowband certs` "
                           "makes a test CA), or --insecure to do it anyway (only inside a VPN or a private network)")


def check_http_exposure(host: str, tls: ServerTls | None, insecure: bool, what: str) -> None:
    """The dashboard and metrics follow the gRPC port's rule: off loopback, TLS (the same certificate) or
    ``--insecure``."""
    if tls is None and not insecure and not is_loopback(host):
        raise StartupError(f"refusing to serve {what} on {host or '*'} without TLS: the read token and the run's "
                           "progress would cross the network in clear. Give --tls-cert and --tls-key (it is then "
                           "served over HTTPS with that certificate), serve it on 127.0.0.1, or --insecure")


def ensure_join_token(cfg: RunFile, state_dir: Path, loopback: bool) -> tuple[RunFile, str]:
    """The run file with a join token when it listens off loopback: its own, or the one generated (once) for this
    state dir. Returns (run file, the generated token to print, or "")."""
    if cfg.membership.join_token or loopback:
        return cfg, ""
    path = state_dir / TOKEN_FILE
    try:
        token = path.read_text().strip() if path.exists() else ""
        if not token:
            token = secrets.token_urlsafe(24)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
    except OSError as exc:
        raise StartupError(f"this run listens off loopback and its run file sets no [membership] join_token; "
                           f"generating one in {path} failed: {exc.strerror or exc}") from None
    return dataclasses.replace(cfg, membership=dataclasses.replace(cfg.membership, join_token=token)), token


def return_freed_memory_to_the_system(threshold: int = 1 << 20) -> bool:
    """Ask glibc to serve allocations of ``threshold`` bytes or more with their own mappings, returned to the system
    when freed. By default glibc raises that threshold to the size of the largest block freed (up to 32 MiB), after
    which a model's tensors come from the heap and the memory of one freed at start-up (the seeded model the
    reference is cloned from) or after a round (the aggregate) stays resident. False where this is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters (malloc.h)
        return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, threshold))
    except (OSError, AttributeError):
        return False
