"""Bounded, signed access to a hivemind DHT: every call into it (its request pipe, our P2P replica's event loop) has a
time limit, and a network fault becomes a logged miss, never an exception out of a round.

Every record is stored under this peer's public key as its subkey and signed in the DHT process (``dht_signing``);
every read returns only the records a member of the run wrote, by the writer's name (``dht_trust.RunTrust.open``;
the rest are counted as rejected). ``_read_raw`` is for the few readers that judge records themselves (the run's
config).

These limits are real time on purpose (``time.monotonic``, ``Future.result(timeout)``): they bound how long we
block on another process, whatever clock the round's own waits are decided on (``node.clock``). A read that
``faults`` (``dht_faults.DhtFaults``) says fails is not sent, and reads as a failed lookup does. Repeated warnings
(a lookup failing on every poll of a lossy link) are logged at most once per ``WARN_EVERY_S`` per key kind."""
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
from node.transport.dht_signing import SignedRecordValidator, key_id, rejections_call
from node.transport.dht_trust import RunTrust, key_kind

log = logging.getLogger(__name__)
WARN_EVERY_S = 30.0


class BoundedDht:
    """Mixed into the DHT transport; its state and share modules read and write records through these too."""

    dht: hivemind.DHT
    name: str
    run_id: str
    rpc_timeout_s: float
    faults: DhtFaults  # reads a test wants to fail
    trust: RunTrust  # who may write in this run; this peer's key and grant
    validator: SignedRecordValidator  # the DHT process's validator (its counts are fetched from there)
    _lock: threading.Lock  # serialises sends into the DHT's pipe
    _loop: asyncio.AbstractEventLoop  # runs our P2P replica's streams
    _background: set[Future[Any]]  # stores nobody waits for (``_store_later``), held until they finish
    _warned: dict[str, float]  # key kind → when a failed call on it was last logged
    _kinds: dict[bytes, str]  # DHT key id → key kind, for the validator's counts

    def _warn(self, key: str, what: str, *args: Any) -> None:
        """A warning about ``key``, at most once per ``WARN_EVERY_S`` per kind of key (else at debug level)."""
        self._warn_every(key_kind(self.run_id, key), "[node=%s] " + what, self.name, *args)

    def _warn_every(self, group: str, fmt: str, *args: Any, logger: logging.Logger = log) -> None:
        """``logger.warning(fmt, *args)`` at most once per ``WARN_EVERY_S`` per ``group``; the rest at debug level
        (a warning that repeats every poll or every round says nothing new)."""
        now = time.monotonic()
        due = now >= self._warned.get(group, -1e18) + WARN_EVERY_S
        if due:
            self._warned[group] = now
        logger.log(logging.WARNING if due else logging.DEBUG, fmt, *args)

    def _kind(self, key: str) -> str:
        kind = key_kind(self.run_id, key)
        if len(self._kinds) < 4096:
            self._kinds.setdefault(key_id(key), kind)
        return kind

    def refresh_rejections(self) -> dict[str, int]:
        """The counts of ignored records, with the DHT process's validator's fetched now; "kind: reason" → n."""
        try:
            counts = self._dht_future(self.dht.run_coroutine, rejections_call(self.validator))
        except Exception as exc:
            log.debug("[node=%s] could not read the validator's counts: %r", self.name, exc)
            counts = None
        if counts is not None:
            merged: dict[tuple[str, str], int] = {}
            for kid, reasons in counts.items():
                kind = self._kinds.get(kid, "other run or key")
                for reason, n in reasons.items():
                    merged[(kind, reason)] = merged.get((kind, reason), 0) + n
            self.trust.rejections.set_validator_counts(merged)
        return self.trust.rejections.snapshot()

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

    def _store(self, key: str, body: Any, expiration: float) -> bool:
        """Store ``body`` as this peer's record under ``key`` (signed in the DHT process); whether it was stored."""
        self._kind(key)
        try:
            return bool(self._dht_future(self.dht.store, key, self.trust.pack(body), expiration,
                                         subkey=self.trust.key.public))
        except Exception as exc:  # a network fault must not escape submit/collect
            self._warn(key, "DHT store %s failed: %r", key, exc)
            return False

    def _store_later(self, key: str, body: Any, expiration: float) -> None:
        """Send a store and return at once: for records that help others later but that no step of ours waits on
        (each costs a DHT lookup, several round trips on a slow link)."""
        if not self.dht.is_alive():
            return
        self._kind(key)
        with self._lock:
            fut = self.dht.store(key, self.trust.pack(body), expiration, subkey=self.trust.key.public,
                                 return_future=True)
        self._background.add(fut)

        def done(f: Future[Any]) -> None:
            self._background.discard(f)
            if not f.cancelled() and (f.exception() is not None or not f.result()):  # cancelled: we are closing
                self._warn(key, "DHT store %s (in the background) failed: %r", key, f.exception())

        fut.add_done_callback(done)

    def _read(self, key: str) -> dict[str, Any]:
        """name → body of the members' live (unexpired) records under ``key``; empty on any fault."""
        return self._read_or_none(key) or {}

    def _read_or_none(self, key: str) -> dict[str, Any] | None:
        """Like ``_read``, but None when the read failed: "I could not see" is not "nobody announced"."""
        return self._read_many([key])[0]

    def _read_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        """``_read_or_none`` of several keys at once: the lookups run concurrently in the DHT process, so a poll
        of three records costs one lookup's round trips, not three."""
        raws = self._read_raw_many(keys)
        return [None if raw is None else self._open_records(key, raw) for key, raw in zip(keys, raws)]

    def _open_records(self, key: str, raw: dict[Any, Any]) -> dict[str, Any]:
        """The member records among ``raw`` (subkey → stored value), by writer name (``DhtMembers`` reads the
        heartbeats its own way)."""
        return self.trust.open(self._kind(key), raw)

    def _read_raw(self, key: str) -> dict[Any, Any]:
        """writer key → stored value of every live record under ``key``, unjudged; empty on any fault."""
        return self._read_raw_many([key])[0] or {}

    def _read_raw_many(self, keys: Sequence[str]) -> list[dict[Any, Any] | None]:
        pending = [self._start_read(key) for key in keys]
        until = time.monotonic() + self.rpc_timeout_s
        return [self._finish_read(key, fut, until) for key, fut in zip(keys, pending)]

    def _start_read(self, key: str) -> Future[Any] | None:
        """Send a read into the DHT process (None: it is not running, or it fails by an injected fault);
        ``_finish_read`` takes the answer."""
        self._kind(key)
        if self.faults.read_fails(key):
            log.warning("[node=%s] DHT get %s failed: injected fault", self.name, key)
            return None
        if not self.dht.is_alive():
            self._warn(key, "DHT get %s failed: the DHT process is not running", key)
            return None
        with self._lock:
            return self.dht.get(key, latest=True, return_future=True)

    def _finish_read(self, key: str, fut: Future[Any] | None, until: float) -> dict[Any, Any] | None:
        """The live entries of a read ``_start_read`` sent, or None when it failed; waits at most until ``until``."""
        if fut is None:
            return None
        try:
            found = fut.result(timeout=max(0.0, until - time.monotonic()))
        except Exception as exc:
            fut.cancel()
            self._warn(key, "DHT get %s failed: %r", key, exc)
            return None
        if found is None or not isinstance(found.value, dict):
            return {}
        now = get_dht_time()
        return {k: v.value for k, v in found.value.items() if v.expiration_time > now}
