"""Two small helpers of the node's gRPC client: a watch that cancels a stalled streaming call, and the hint for a
connection closed during its TLS handshake."""
from __future__ import annotations

import threading
from typing import Any

import grpc

from node.clock import SYSTEM_CLOCK, Clock
from node.transport.grpc_auth import ClientTls


class StallWatch:
    """Cancels a streaming call once nothing arrived for ``idle_s`` (``first_s`` before the first message), however
    long it runs while messages keep coming: a result that takes minutes on a slow downlink must not be cut by a
    fixed deadline, and a stalled one must not hang. Use as a context manager around the iteration (a thread then
    calls ``check`` until the block ends); time is ``clock``'s (seconds)."""

    def __init__(self, call: Any, first_s: float, idle_s: float, clock: Clock = SYSTEM_CLOCK) -> None:
        self.call, self.idle_s, self.clock = call, idle_s, clock
        self.due = clock.now() + first_s
        self.stalled = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall-watch", daemon=True)

    def progressed(self) -> None:
        self.due = self.clock.now() + self.idle_s

    def check(self) -> bool:
        """Cancel the call if its due time passed; returns whether it is (now) stalled."""
        if not self.stalled and not self._done.is_set() and self.clock.now() >= self.due:
            self.stalled = True
            self.call.cancel()
        return self.stalled

    def _watch(self) -> None:
        while not self.check() and not self.clock.sleep(max(0.05, min(1.0, self.due - self.clock.now())),
                                                        self._done):
            pass

    def __enter__(self) -> "StallWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)


def tls_hint(exc: grpc.RpcError, tls: ClientTls | None) -> str:
    """What to check when a connection is closed during its handshake ("Socket closed"): the usual cause is a TLS
    mismatch (a plaintext node and a coordinator that serves TLS, or no client certificate for mutual TLS), which
    gRPC reports only as an unreachable coordinator."""
    if exc.code() != grpc.StatusCode.UNAVAILABLE or "Socket closed" not in (exc.details() or ""):
        return ""
    if tls is None:
        return (" (if the coordinator serves TLS it closes plaintext connections: pass --tls-ca CA.pem, and "
                "--tls-cert/--tls-key if it requires client certificates)")
    if tls.cert is None:
        return (" (if the coordinator requires client certificates (--tls-client-ca) it closes connections without "
                "one: pass --tls-cert/--tls-key, made by `lowband certs --node WORKDIR`)")
    return ""
