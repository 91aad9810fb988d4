"""Bounded access to a hivemind DHT: every call into it (its request pipe, our P2P replica's event loop) has a
time limit, and a network fault becomes a logged miss, never an exception out of a round."""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import hivemind
from hivemind.utils import get_dht_time

log = logging.getLogger(__name__)


class BoundedDht:
    """Mixed into the DHT transport; its state and share modules read and write records through these too."""

    dht: hivemind.DHT
    name: str
    rpc_timeout_s: float
    _lock: threading.Lock  # serialises sends into the DHT's pipe
    _loop: asyncio.AbstractEventLoop  # runs our P2P replica's streams

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

    def _read(self, key: str) -> dict[str, Any]:
        """subkey → value of the live (unexpired) entries under ``key``; empty on any fault."""
        return self._read_or_none(key) or {}

    def _read_or_none(self, key: str) -> dict[str, Any] | None:
        """Like ``_read``, but None when the read failed: "I could not see" is not "nobody announced"."""
        try:
            found = self._dht_future(self.dht.get, key, latest=True)
        except Exception as exc:
            log.warning("[node=%s] DHT get %s failed: %r", self.name, key, exc)
            return None
        if found is None or not isinstance(found.value, dict):
            return {}
        now = get_dht_time()
        return {k: v.value for k, v in found.value.items() if v.expiration_time > now}
