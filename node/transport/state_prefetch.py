"""A joining node's state download, started before anything else in the process.

On a slow link a join is mostly the state transfer (≈ 200 MB for a 25M-parameter model with outer momentum),
and a fresh process spends seconds importing torch and building its task and model before it can Join. Both
can happen at once: the coordinator serves the state to a node that has not joined yet if it holds the run's
join token (the request is signed by the node's key, so the coordinator knows which node already holds the state
when it joins), so ``lowband node`` starts this download first and hands it to the daemon, which checks it like
any state (fingerprint) and applies the rounds that closed meanwhile.

Only gRPC and the generated messages are imported here: importing torch first would defeat the purpose.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from node.identity import NodeKey
from node.transport.grpc_auth import ClientTls
from node.transport.grpc_client import GrpcTransport
from node.transport.messages import StateBlob

if TYPE_CHECKING:  # limits.py imports torch, which this module must not import first
    from node.transport.limits import ResultLimits

log = logging.getLogger(__name__)


class StatePrefetch:
    def __init__(self, address: str, join_token: str = "", timeout_s: float = 600.0, *, key: NodeKey | None = None,
                 tls: ClientTls | None = None) -> None:
        self.started = time.monotonic()
        self.finished: float | None = None
        self._stop = threading.Event()
        self._transport = GrpcTransport(address, self._stop, key=key, tls=tls, token=join_token)
        self._result: StateBlob | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._download, args=(join_token, timeout_s), daemon=True,
                                        name="state-prefetch")
        self._thread.start()

    def _download(self, join_token: str, timeout_s: float) -> None:
        try:
            # min_committed=1: before the first round commits every node builds the state itself from the seed
            self._result = self._transport.fetch_state(timeout_s, join_token=join_token, min_committed=1)
        except Exception as exc:  # noqa: BLE001 — any failure just means the daemon fetches as a member
            if not self._stop.is_set():
                log.info("state prefetch gave up (%s: %s); the state is fetched after Join", type(exc).__name__, exc)
        finally:
            self.finished = time.monotonic()
            self._done.set()
            self._transport.close()

    def take(self, stop: threading.Event) -> StateBlob | None:
        """The downloaded state once the download ends (None if there is none to use); waits while it runs."""
        while not self._done.wait(0.5):
            if stop.is_set():
                self.cancel()
                return None
        result, self._result = self._result, None
        return result

    def bound(self, limits: "ResultLimits") -> None:
        """The node's own bounds (its model's, node/transport/limits.py), once it built its model: until then the
        download is held only to generous constants (``UNKNOWN_MODEL``); from its next chunk on, to these."""
        self._transport.limits = limits

    def cancel(self) -> None:
        self._stop.set()
        self._transport.close()  # closing the channel ends the stream in flight

    @property
    def download_s(self) -> float:
        return (self.finished or time.monotonic()) - self.started
