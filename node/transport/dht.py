"""Serverless transport: leaderless rounds over hivemind's DHT, frames pulled peer to peer over its libp2p streams.

Keys (all values msgpack, every record expires):

- ``{run}/peers``         subkey=name → (peer_id, live, from_round)   heartbeat, refreshed every ``heartbeat_s``,
  ttl 3×; a peer is waited for in the rounds from ``from_round`` on (a joiner is not, while it fetches state)
- ``{run}/round/{r}``      subkey=name → (peer_id, size, sha256, reference fingerprint)   "I submitted a
  frame for round r, computed from this reference"
- ``{run}/round/{r}/have`` subkey=name → sorted names whose frames this peer fetched and verified

A round, as every peer runs it in ``collect``:

1. close: wait until every live peer (and every joiner this peer just gave the state of this round) announced,
   or the round's wait after the first announcement this peer saw (bounded by ``timeout_s``); the group G =
   the announcements read then. The wait adapts as in the coordinator (``coordinator.membership.round_wait``:
   clamp(margin × quantile of this peer's recent first-to-last announcement spreads)) when a
   ``DeadlinePolicy`` is given, else it is the fixed ``round_wait_s``.
   Members whose announced reference differs from ours are left out; if another reference is held by more
   members, ours is the diverged one and the result says ``state_needed`` (the daemon fetches the state).
2. fetch: pull every other member's frame over the stream handler ``lowband.{run}.frame`` (request: the round;
   answer: status byte + length-prefixed frame), each within ``fetch_timeout_s``; check size and sha256 against
   the announcement. A member whose frame does not arrive or does not match is dropped, with a logged reason.
3. agree: publish ``have``; wait (≤ ``agree_wait_s``) for the have-lists of all of G; the round's set is
   (what I hold) ∩ (every have-list received) ∩ (the members that published one). Because a peer's have-list
   only names what it holds, a frame that any member failed to get is dropped by everyone who reads that list.

Limits, stated plainly:
- Not Byzantine-fault tolerant: a peer can lie in its have-list or announce different frames to different
  peers' reads; peers are trusted to run this code. sha256 only catches corruption / mismatched serving.
- Agreement holds when every member's have-list reaches every member within ``agree_wait_s``. A member that
  dies (or stalls) between phases is dropped after that bounded wait; if its list reached some peers but not
  others, replicas can reduce different sets for that round; the replicas in the minority see it in the next
  round's announcements (the reference fingerprints differ) and fetch the state.
- A peer whose clock of "first announcement seen" starts late closes later; a latecomer that announced after
  some peers closed is excluded by them and, through their have-lists, by everyone.
- State for joiners is served by the peers themselves (``dht_state.StateShare``: chunked, multi-donor).
- Leave is announced by a (peer, False) record; hivemind cannot shorten a record's expiration.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from typing import Any, Callable, Sequence

import hivemind
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time

from coordinator.config import DeadlinePolicy
from coordinator.membership import round_wait
from node.transport.base import Membership, RoundResult, State, Transport
from node.transport.dht_state import DEFAULT_CHUNK, StateShare

log = logging.getLogger(__name__)
_OK, _MISSING = b"\x00", b"\x01"
_KEEP_ROUNDS = 8  # frames served for this many recent rounds (a slow peer may still be fetching)


class DhtTransport(Transport):
    def __init__(self, run_id: str, name: str, dht: hivemind.DHT, round_wait_s: float = 5.0, *,
                 first_round: int = 0, heartbeat_s: float = 1.0, rpc_timeout_s: float = 5.0,
                 fetch_timeout_s: float = 10.0, agree_wait_s: float | None = None, poll_s: float = 0.05,
                 owns_dht: bool = False, deadline: DeadlinePolicy | None = None,
                 state_chunk_bytes: int = DEFAULT_CHUNK, cancel: threading.Event | None = None,
                 min_members: int = 1) -> None:
        self.run_id, self.name, self.dht = run_id, name, dht
        self.round_wait_s, self.first_round = round_wait_s, first_round
        self.heartbeat_s, self.rpc_timeout_s, self.poll_s = heartbeat_s, rpc_timeout_s, poll_s
        self.fetch_timeout_s = fetch_timeout_s
        self.agree_wait_s = fetch_timeout_s + round_wait_s if agree_wait_s is None else agree_wait_s
        self.owns_dht = owns_dht
        self.deadline = deadline
        self.min_members = min_members  # a round commits only with at least this many agreed frames
        self.spreads: list[float] = []  # first-to-last announcement times of recent complete rounds
        self.from_round = first_round
        self.joined = False
        self.handler_name = f"lowband.{run_id}.frame"
        self._frames: dict[int, bytes] = {}
        self._served: dict[int, int] = {}  # round → bytes this node streamed to peers
        self._fingerprints: dict[int, str] = {}  # round → our reference fingerprint when we submitted
        self._lock = threading.Lock()  # guards _frames/_served and serialises sends into the DHT's pipe
        self._stop = threading.Event()
        self.cancel = cancel or threading.Event()  # the owner's stop (e.g. SIGTERM): abandon waits for a round
        self._hb: threading.Thread | None = None
        self._hb_expiration = 0.0
        self._closed = False
        # our own event loop: the P2P replica's streams live on it; sync callers submit coroutines with a timeout
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name=f"dht-{name}", daemon=True)
        self._loop_thread.start()
        try:
            maddr = self._dht_future(dht.run_coroutine, hivemind.DHT._get_p2p_daemon_listen_maddr)
            self.p2p: P2P = self._run(P2P.replicate(maddr))
            self.peer_id: str = self.p2p.peer_id.to_base58()
            self._run(self.p2p.add_binary_stream_handler(self.handler_name, self._serve))
            self.state = StateShare(self, state_chunk_bytes)
            self._run(self.p2p.add_binary_stream_handler(self.state.handler_name, self.state.serve))
        except BaseException:
            self.close(announce_leave=False)
            raise

    @classmethod
    def create(cls, run_id: str, name: str, initial_peers: Sequence[str] = (), *,
               host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",), nat_port_map: bool = False,
               auto_nat: bool = False, use_relay: bool = False, client_mode: bool = False,
               identity_path: str | None = None, start_timeout_s: float = 30.0, **kw: Any) -> "DhtTransport":
        """Start a DHT (and its p2pd) owned by the transport: ``close``/``leave`` shut it down.
        NAT traversal is off unless asked for, so nothing but ``host_maddrs`` is touched."""
        extra: dict[str, Any] = {"identity_path": identity_path} if identity_path else {}
        dht = hivemind.DHT(initial_peers=list(initial_peers), host_maddrs=list(host_maddrs), start=True,
                           await_ready=False, nat_port_map=nat_port_map, auto_nat=auto_nat, use_relay=use_relay,
                           client_mode=client_mode, **extra)
        try:
            dht.wait_until_ready(timeout=start_timeout_s)
        except BaseException:
            dht.shutdown()
            raise
        return cls(run_id, name, dht, owns_dht=True, **kw)

    def visible_maddrs(self) -> list[str]:
        return [str(m) for m in self._dht_future(self.dht.run_coroutine, hivemind.DHT._get_visible_maddrs)]

    # -- plumbing: every call into hivemind is bounded ---------------------------------------------------
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

    # -- membership ---------------------------------------------------------------------------------------
    def live_peers(self, round_: int | None = None) -> set[str]:
        """Peers with a live heartbeat (that take part in ``round_``, if given)."""
        live = set()
        for name, v in self._read(f"{self.run_id}/peers").items():
            if isinstance(v, (list, tuple)) and len(v) == 3 and v[1] is True and isinstance(v[2], int):
                if round_ is None or v[2] <= round_:
                    live.add(name)
        return live

    def _heartbeat(self) -> None:
        self._hb_expiration = get_dht_time() + 3 * self.heartbeat_s
        self._store(f"{self.run_id}/peers", self.name, (self.peer_id, True, self.from_round), self._hb_expiration)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self._heartbeat()

    def join(self, from_round: int | None = None) -> Membership:
        """Start heartbeats: from now on the peers wait for this peer's frame in rounds ≥ ``from_round``."""
        if from_round is not None:
            self.from_round = from_round
        self.joined = True
        self._heartbeat()
        if self._hb is None:
            self._hb = threading.Thread(target=self._heartbeat_loop, name=f"dht-hb-{self.name}", daemon=True)
            self._hb.start()
        return Membership(self.name, tuple(sorted(self.live_peers() | {self.name})), self.from_round)

    # -- serving frames -----------------------------------------------------------------------------------
    async def _serve(self, _info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            round_ = int.from_bytes(await asyncio.wait_for(P2P.receive_raw_data(reader), self.fetch_timeout_s), "big")
            with self._lock:
                frame = self._frames.get(round_)
                if frame is not None:
                    self._served[round_] = self._served.get(round_, 0) + len(frame)
            writer.write(_MISSING if frame is None else _OK)
            await asyncio.wait_for(P2P.send_raw_data(frame or b"", writer), self.fetch_timeout_s)
            # closing our end at once can cut the frame short in p2pd: hold the stream until the caller
            # has read it and closed (as hivemind's own handlers do), bounded
            await asyncio.wait_for(reader.read(1), self.fetch_timeout_s)
        except Exception as exc:
            log.debug("[node=%s] serving a frame failed: %r", self.name, exc)
        finally:
            writer.close()

    async def _fetch(self, peer_id: str, round_: int) -> bytes:
        _info, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id),
                                                                          self.handler_name)
        try:
            await P2P.send_raw_data(round_.to_bytes(8, "big"), writer)
            status = await reader.readexactly(1)
            data = await P2P.receive_raw_data(reader)
        finally:
            writer.close()
        if status != _OK:
            raise LookupError("peer holds no frame for this round")
        return data

    async def _fetch_all(self, round_: int, wanted: dict[str, tuple[str, int, str]],
                         timeout: float) -> dict[str, bytes | str]:
        """sender → frame, or → the reason it was dropped."""
        async def one(sender: str, peer_id: str, size: int, digest: str) -> bytes | str:
            until = time.monotonic() + timeout
            while True:  # a broken stream is retried while the bound allows: one cut stream must not drop a peer
                try:
                    data = await asyncio.wait_for(self._fetch(peer_id, round_), max(0.05, until - time.monotonic()))
                    break
                except asyncio.TimeoutError:
                    return f"no frame within {timeout:.1f}s"
                except LookupError as exc:  # a definite answer: the peer has no frame for this round
                    return f"fetch failed: {exc}"
                except Exception as exc:
                    if time.monotonic() + 0.2 >= until:
                        return f"fetch failed: {exc!r}"
                    log.info("[node=%s round=%d] fetching %s failed (%r); retrying", self.name, round_, sender, exc)
                    await asyncio.sleep(0.1)
            if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
                return f"frame does not match its announcement (size {len(data)} vs {size}, sha256 mismatch)"
            return data
        senders = sorted(wanted)
        got = await asyncio.gather(*(one(s, *wanted[s]) for s in senders))
        return dict(zip(senders, got))

    # -- a round ------------------------------------------------------------------------------------------
    def submit(self, round_: int, payload: bytes, fingerprint: str = "") -> None:
        """Announce and serve ``payload`` for ``round_``. ``fingerprint``: this replica's reference before the round
        (peers whose reference differs are kept out of each other's rounds; "" = not checked)."""
        with self._lock:
            self._frames[round_] = payload
            self._fingerprints[round_] = fingerprint
            for old in [r for r in self._frames if r <= round_ - _KEEP_ROUNDS]:
                self._frames.pop(old, None)
                self._served.pop(old, None)
                self._fingerprints.pop(old, None)
            for old in [r for r in self.state.expected if r < round_]:
                self.state.expected.pop(old, None)
        value = (self.peer_id, len(payload), hashlib.sha256(payload).hexdigest(), fingerprint)
        ttl = max(60.0, 4 * (self.round_wait_s + self.agree_wait_s))
        self._store(f"{self.run_id}/round/{round_}", self.name, value, get_dht_time() + ttl)

    def _same_reference(self, round_: int, announced: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """Keep the members whose reference (announced fingerprint) equals ours. If another reference is held by
        more members (ties: the larger fingerprint string), ours is the diverged one: ("", why) tells the caller
        to fetch the state. Every member applies the same rule to the same announcements, so a diverged replica
        is left out by the others exactly when it leaves itself out."""
        mine = self._fingerprints.get(round_, "")
        groups: dict[str, set[str]] = {}
        for sender, v in announced.items():
            groups.setdefault(v[3], set()).add(sender)
        if not mine or len(groups) <= 1:
            return announced, ""
        checked = {fp: members for fp, members in groups.items() if fp}
        best = max(checked.items(), key=lambda kv: (len(kv[1]), kv[0]))[0]
        if best != mine:
            return {}, (f"this replica's reference {mine} differs from the run's {best} "
                        f"(held by {len(checked[best])} members): fetching the state")
        keep = {s: v for s, v in announced.items() if v[3] in (mine, "")}
        for sender in sorted(set(announced) - set(keep)):
            log.warning("[node=%s round=%d] dropped %s: its reference %s differs from ours %s (a diverged replica)",
                        self.name, round_, sender, announced[sender][3], mine)
        return keep, ""

    def _given_up(self) -> bool:
        """Wait one poll interval; True when waiting longer is pointless (closed, cancelled, DHT process gone)."""
        return self._stop.wait(self.poll_s) or self.cancel.is_set() or not self.dht.is_alive()

    def round_wait(self) -> tuple[float, str]:
        if self.deadline is None:
            return self.round_wait_s, f"fixed {self.round_wait_s:.1f} s"
        return round_wait(self.spreads, self.deadline)

    def _close_group(self, round_: int, deadline: float) -> dict[str, Any]:
        """Phase 1: the announcements once everyone expected announced or the round's wait ran out."""
        key, first_seen, last_new, count = f"{self.run_id}/round/{round_}", None, 0.0, 0
        wait, why = self.round_wait()
        announced: dict[str, Any] = {}
        while True:
            seen = self._read_or_none(key)
            announced = announced if seen is None else seen  # a failed read keeps the last view (never shrinks it)
            now = time.monotonic()
            if announced and first_seen is None:
                first_seen = now
            if len(announced) > count:
                count, last_new = len(announced), now
            expected = self.live_peers(round_) | self.state.expected.get(round_, set())
            if announced and expected <= set(announced):
                if first_seen is not None:
                    self.spreads = (self.spreads + [last_new - first_seen])[-50:]
                return announced
            if (first_seen is not None and now >= first_seen + wait) or now >= deadline:
                missing = sorted(expected - set(announced))
                log.info("[node=%s round=%d] closing without %s after the round's wait (%s)", self.name, round_,
                         ", ".join(missing) or "nobody", why)
                return announced
            if self._given_up():  # closed, cancelled or DHT gone: nothing more will arrive
                return {}

    def collect(self, round_: int, timeout_s: float) -> RoundResult:
        if self._closed:
            return RoundResult(round_, False, reason="this transport is closed")
        deadline = time.monotonic() + timeout_s
        announced = {s: v for s, v in self._close_group(round_, deadline).items()
                     if isinstance(v, (list, tuple)) and len(v) == 4 and all(isinstance(x, str) for x in v[2:])}
        sent = self._served.get(round_, 0)
        if not announced:
            return RoundResult(round_, False, reason="no peer announced a frame before the deadline", bytes_sent=sent)
        announced, diverged = self._same_reference(round_, announced)
        if diverged:
            return RoundResult(round_, False, reason=diverged, bytes_sent=sent, state_needed=True)
        # phase 2: pull every other member's frame, bounded per peer and by the caller's deadline
        held: dict[str, bytes] = {}
        with self._lock:
            mine = self._frames.get(round_)
        if self.name in announced and mine is not None:
            held[self.name] = mine
        others = {s: tuple(v[:3]) for s, v in announced.items() if s != self.name}
        budget = max(0.1, min(self.fetch_timeout_s, deadline - time.monotonic()))
        try:
            fetched = self._run(self._fetch_all(round_, others, budget), timeout=budget + self.rpc_timeout_s)
        except Exception as exc:  # only if the loop itself is gone; each fetch is bounded on its own
            fetched = {s: f"fetch failed: {exc!r}" for s in others}
        received = 0
        for sender, got in fetched.items():
            if isinstance(got, bytes):
                held[sender] = got
                received += len(got)
            else:
                log.warning("[node=%s round=%d] dropped %s: %s", self.name, round_, sender, got)
        # phase 3: agree on the intersection of what every member holds
        have_key = f"{self.run_id}/round/{round_}/have"
        ttl = max(60.0, 4 * (self.round_wait_s + self.agree_wait_s))
        self._store(have_key, self.name, sorted(held), get_dht_time() + ttl)
        agree_until = min(deadline, time.monotonic() + self.agree_wait_s)
        while True:
            haves = {s: set(v) for s, v in self._read(have_key).items() if s in announced and isinstance(v, list)}
            haves[self.name] = set(held)
            if set(announced) <= set(haves) or time.monotonic() >= agree_until or self._given_up():
                break
        confirmed = {s for s in haves if s in announced}  # members that published a have-list in time
        others = confirmed - {self.name}
        sent = self._served.get(round_, 0)
        if others and (self.name not in announced or not any(self.name in haves[s] for s in others)):
            # we are outside the round (observing, or our frame reached nobody in time): the others decided it
            # without our have-list, so we must reduce exactly what they all hold — or not apply the round at all
            final = set(others)
            for sender in others:
                final &= haves[sender]
            lacking = sorted(final - set(held))
            if lacking:
                return RoundResult(round_, False, reason=f"the members agreed on frames this node could not get "
                                   f"({', '.join(lacking)}): fetching the state instead", bytes_sent=sent,
                                   bytes_received=received, state_needed=True)
        else:
            final = set(held) & confirmed
            for sender in confirmed:
                final &= haves[sender]
        for sender in sorted(set(held) - final):
            reason = "published no have-list in time" if sender not in haves else "another member does not hold it"
            log.warning("[node=%s round=%d] dropped %s: %s", self.name, round_, sender, reason)
        if not final:
            return RoundResult(round_, False, reason="no frame is held by every member", bytes_sent=sent,
                               bytes_received=received)
        if len(final) < self.min_members:
            # a peer cut off from the others must not go on alone: that is how replicas split
            return RoundResult(round_, False, reason=f"only {len(final)} member(s) agreed, fewer than the run's "
                               f"min_nodes {self.min_members}", bytes_sent=sent, bytes_received=received)
        missing = sorted(set(announced) - final)
        reason = "every announced member agreed" if not missing else f"committed without {', '.join(missing)}"
        payloads = {s: held[s] for s in sorted(final)}
        return RoundResult(round_, True, payloads, reason=reason, bytes_sent=sent, bytes_received=received)

    # -- state and shutdown -------------------------------------------------------------------------------
    def fetch_state(self, timeout_s: float = 60.0) -> State | None:
        """The newest state any peer serves (asking for it through ``{run}/want``), or None within ``timeout_s``."""
        got = self.state.fetch(0, timeout_s)
        return None if got is None else (got.offer.committed, got.blob, got.offer.fingerprint)

    def offer_state(self, committed: int, fingerprint: str, make_blob: Callable[[], bytes]) -> bool:
        return self.state.offer(committed, fingerprint, make_blob)

    def leave(self) -> None:
        self.close(announce_leave=True)

    def close(self, announce_leave: bool = True) -> None:
        """Stop heartbeats, mark this peer as gone (unless simulating a crash), drop the stream handler and
        the P2P replica, and shut down the DHT (and its p2pd) if this transport started it."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._hb is not None:
            self._hb.join(timeout=self.rpc_timeout_s + self.heartbeat_s)
        if announce_leave and hasattr(self, "peer_id") and self.dht.is_alive():
            # hivemind keeps the record with the later expiration: outlive the last heartbeat
            expiration = max(self._hb_expiration, get_dht_time()) + 1.0
            self._store(f"{self.run_id}/peers", self.name, (self.peer_id, False), expiration)
        if hasattr(self, "p2p"):
            steps = [self.p2p.remove_binary_stream_handler(self.handler_name)]
            if hasattr(self, "state"):
                steps.append(self.p2p.remove_binary_stream_handler(self.state.handler_name))
            for step in (*steps, self.p2p.shutdown()):
                try:
                    self._run(step)
                except Exception as exc:
                    log.debug("[node=%s] P2P replica shutdown: %r", self.name, exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=self.rpc_timeout_s)
        if self.owns_dht:
            self.dht.shutdown()  # bounded by the DHT's shutdown_timeout, then terminate()
