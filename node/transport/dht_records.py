"""Bounded access to a hivemind DHT: every call into it (its request pipe, our P2P replica's event loop) has a
time limit, and a network fault becomes a logged miss, never an exception out of a round.

These limits are real time on purpose (``time.monotonic``, ``Future.result(timeout)``): they bound how long we
block on another process, whatever clock the round's own waits are decided on (``node.clock``). A read that
``faults`` (``dht_faults.DhtFaults``) says fails is not sent, and reads as a failed lookup does."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any, Sequence

import hivemind
from hivemind.utils import get_dht_time

from node.transport.dht_faults import DhtFaults

log = logging.getLogger(__name__)


class BoundedDht:
    """Mixed into the DHT transport; its state and share modules read and write records through these too."""

    dht: hivemind.DHT
    name: str
    rpc_timeout_s: float
    faults: DhtFaults  # reads a test wants to fail
    _lock: threading.Lock  # serialises sends into the DHT's pipe
    _loop: asyncio.AbstractEventLoop  # runs our P2P replica's streams
    _background: set[Future[Any]]  # stores nobody waits for (``_store_later``), held until they finish

    def _run(self, coro: Any, timeout: float | None = None) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout=self.rpc_timeout_s if timeout is None else timeout)
        except BaseException:
            fut.cancel()
            raise

    def _dht_future(self, method: Any, *args: Any, **kw: Any) -> Any:
        if not self.dht.is_alive():  # e.g. a process-group SIGTERM reached the DHT process before us
            raise ConnectionError("the DHT process is not running")
        with self._lock:  # the DHT's request pipe is shared by our threads
            fut = method(*args, return_future=True, **kw)
        try:
            return fut.result(timeout=self.rpc_timeout_s)
        except BaseException:
            fut.cancel()
            raise

    def _store(self, key: str, subkey: str, value: Any, expiration: float) -> bool:
        try:
            return bool(self._dht_future(self.dht.store, key, value, expiration, subkey=subkey))
        except Exception as exc:  # a network fault must not escape submit/collect
            log.warning("[node=%s] DHT store %s failed: %r", self.name, key, exc)
            return False

    def _store_later(self, key: str, subkey: str, value: Any, expiration: float) -> None:
        """Send a store and return at once: for records that help others later but that no step of ours waits on
        (each costs a DHT lookup, several round trips on a slow link)."""
        if not self.dht.is_alive():
            return
        with self._lock:
            fut = self.dht.store(key, value, expiration, subkey=subkey, return_future=True)
        self._background.add(fut)

        def done(f: Future[Any]) -> None:
            self._background.discard(f)
            if not f.cancelled() and (f.exception() is not None or not f.result()):  # cancelled: we are closing
                log.warning("[node=%s] DHT store %s (in the background) failed: %r", self.name, key, f.exception())

        fut.add_done_callback(done)

    def _read(self, key: str) -> dict[str, Any]:
        """subkey → value of the live (unexpired) entries under ``key``; empty on any fault."""
        return self._read_or_none(key) or {}

    def _read_or_none(self, key: str) -> dict[str, Any] | None:
        """Like ``_read``, but None when the read failed: "I could not see" is not "nobody announced"."""
        return self._read_many([key])[0]

    def _read_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        """``_read_or_none`` of several keys at once: the lookups run concurrently in the DHT process, so a poll
        of three records costs one lookup's round trips, not three."""
        pending = [self._start_read(key) for key in keys]
        until = time.monotonic() + self.rpc_timeout_s
        return [self._finish_read(key, fut, until) for key, fut in zip(keys, pending)]

    def _start_read(self, key: str) -> Future[Any] | None:
        """Send a read into the DHT process (None: it is not running, or it fails by an injected fault);
        ``_finish_read`` takes the answer."""
        if self.faults.read_fails(key):
            log.warning("[node=%s] DHT get %s failed: injected fault", self.name, key)
            return None
        if not self.dht.is_alive():
            log.warning("[node=%s] DHT get %s failed: the DHT process is not running", self.name, key)
            return None
        with self._lock:
            return self.dht.get(key, latest=True, return_future=True)

    def _finish_read(self, key: str, fut: Future[Any] | None, until: float) -> dict[str, Any] | None:
        """The live entries of a read ``_start_read`` sent, or None when it failed; waits at most until ``until``."""
        if fut is None:
            return None
        try:
            found = fut.result(timeout=max(0.0, until - time.monotonic()))
        except Exception as exc:
            fut.cancel()
            log.warning("[node=%s] DHT get %s failed: %r", self.name, key, exc)
            return None
        if found is None or not isinstance(found.value, dict):
            return {}
        now = get_dht_time()
        return {k: v.value for k, v in found.value.items() if v.expiration_time > now}
