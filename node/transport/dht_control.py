"""``ControlPlane`` with no server: peers agree on the run through a hivemind DHT and exchange frames with
``DhtTransport`` (leaderless rounds, frames pulled peer to peer).

Run agreement. There is no coordinator to hand out the run, so every node brings the run file and publishes
what must be identical across the run — the run config, the task fingerprint, the model digest and the DHT
settings below — as JSON under ``{run_id}/config`` (subkey: the hash of that JSON, expiring after
``CONFIG_TTL_S``). The run's config is the *earliest published* record there; a node whose own record differs
from it is refused (exit 3) with the differing fields, and publishes nothing. A node that published in a race
and finds an earlier different record refuses too; its later record never decides anything, so a
misconfigured node cannot lock the real run out.

Data shards: ``shard = sha256(name) mod num_shards`` with ``num_shards`` = the run file's
``membership.max_nodes`` (part of the agreed record). Deterministic and needs no coordination; two names can
land on the same shard (those nodes then read the same data order — harmless for the math, a little less data
diversity).

Start and late joiners: nodes wait until ``membership.min_nodes`` peers are live before round 0, so the nodes
present from the start all contribute to it. Every node records under ``{run_id}/progress`` the round it
entered. A node that finds such a record joins mid-way: it does not heartbeat yet (nobody waits for it), asks
for the state (``dht_state``: the peers snapshot it at their next round boundary and it downloads the chunks
from all of them), checks the fingerprint, and only then heartbeats with ``from_round`` = the state's round,
so the peers wait for its frame from that round on — its first contribution is the round after the one that
was open when it arrived.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from hivemind.utils import get_dht_time

from node.clock import SYSTEM_CLOCK, Clock
from node.membership import DeadlinePolicy
from node.config import RunConfig, diff_configs
from node.transport.control import Identity, JoinInfo, JoinRefused, Stopped
from node.transport.dht import DhtTransport
from node.transport.messages import RoundResult, StateBlob, Submission

log = logging.getLogger(__name__)
CONFIG_TTL_S = 7 * 24 * 3600.0  # outlives any run: a late node must still find what the run agreed on


@dataclass(frozen=True)
class DhtSettings:
    """How to reach the DHT, and the run-file knobs that serverless rounds use."""

    initial_peers: tuple[str, ...]
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    nat: bool = False  # hivemind's nat_port_map / auto_nat / use_relay, all together
    identity_path: str | None = None
    client_mode: bool = False  # hivemind client mode: for a peer behind NAT (reached through relays)
    announce_maddrs: tuple[str, ...] = ()  # what the other peers dial, if not the listen addresses
    num_shards: int = 64
    min_nodes: int = 1
    heartbeat_s: float = 1.0
    round_wait_s: float = 30.0  # how long a round stays open after its first frame for the stragglers
    start_timeout_s: float = 3600.0  # the most a node waits for min_nodes peers before round 0
    deadline: DeadlinePolicy | None = None  # adaptive round wait (None: the fixed round_wait_s)
    state_chunk_bytes: int = 4 << 20  # joiners fetch the state in chunks of this size, spread over donors
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def default_signals() -> Iterator[None]:
    """Fork hivemind's DHT process with default SIGTERM/SIGINT handling. It inherits Python-level handlers:
    with the daemon's "set the stop event" handler it would ignore both a process-group SIGTERM and the
    ``terminate()`` that ``DHT.shutdown`` falls back to, and hang its parent's shutdown."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be changed from the main thread (and were not installed elsewhere)
        return
    saved = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def shard_of(name: str, num_shards: int) -> int:
    """A node's data shard from its name alone: stable across processes and machines (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % num_shards


class DhtControl:
    """``clock``: what the waits are decided on — the start wait for ``min_nodes`` peers here, and every wait of the
    transport's rounds and state fetches."""

    def __init__(self, run: RunConfig, settings: DhtSettings, name: str, stop: threading.Event,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.where = "dht"
        self.run, self.settings, self.name, self.stop, self.clock = run, settings, name, stop, clock
        self.lost = threading.Event()  # a DHT peer has no lease to lose: never set
        self._round = 0
        self._run_round = 0  # the highest round any node recorded entering
        with default_signals():
            self.transport = DhtTransport.create(
                run.run_id, name, list(settings.initial_peers), host_maddrs=list(settings.host_maddrs),
                nat_port_map=settings.nat, auto_nat=settings.nat, use_relay=settings.nat,
                identity_path=settings.identity_path, client_mode=settings.client_mode,
                announce_maddrs=settings.announce_maddrs,
                round_wait_s=settings.round_wait_s, heartbeat_s=settings.heartbeat_s, deadline=settings.deadline,
                state_chunk_bytes=settings.state_chunk_bytes, cancel=stop, min_members=settings.min_nodes,
                clock=clock, **settings.extra)
        for maddr in self.transport.visible_maddrs():  # other nodes can bootstrap through any of these
            log.info("[node=%s] DHT address %s", name, maddr)
        self._key = f"{run.run_id}/config"
        self._progress_key = f"{run.run_id}/progress"

    @property
    def current_round(self) -> int:
        return max(self._round, self._run_round)

    def get_run_config(self) -> RunConfig:
        return self.run  # the local run file is the only source; agreement is checked in join()

    # -- agreement ----------------------------------------------------------------------------------------
    def _record(self, identity: Identity) -> dict[str, Any]:
        """Everything that must be equal on every node of the run (diffed field by field on a mismatch)."""
        return {**json.loads(identity.config_json), "task_fingerprint": identity.task_fingerprint,
                "model_digest": identity.model_digest,
                "dht": {"num_shards": self.settings.num_shards, "min_nodes": self.settings.min_nodes}}

    def _earliest(self) -> tuple[str, dict[str, Any]] | None:
        """(hash, record) of the earliest published config record, ties broken by hash."""
        found = []
        for digest, value in self.transport._read(self._key).items():  # same package: the bounded DHT read
            try:
                text, published_at = value
                found.append((float(published_at), str(digest), json.loads(text)))
            except (TypeError, ValueError) as exc:
                log.warning("ignoring a malformed config record %s: %r", digest, exc)
        if not found:
            return None
        _, digest, record = min(found, key=lambda f: (f[0], f[1]))
        return digest, record

    def _check(self, mine: dict[str, Any], digest: str) -> None:
        earliest = self._earliest()
        if earliest is not None and earliest[0] != digest:
            diffs = diff_configs(mine, earliest[1])
            raise JoinRefused("this node's run differs from the run published in the DHT "
                              f"(this node vs the run): {'; '.join(diffs) or 'hash ' + earliest[0]}")

    def _agree(self, identity: Identity) -> None:
        mine = self._record(identity)
        text = json.dumps(mine, sort_keys=True, default=str)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        self._check(mine, digest)  # before publishing: a refused node leaves no record behind
        stored = self.transport._store(self._key, digest, (text, get_dht_time()), get_dht_time() + CONFIG_TTL_S)
        # a node with the same config may have published the same subkey a moment later (its record wins, and
        # ours is refused as older): the run's record exists either way
        if not stored and digest not in self.transport._read(self._key):
            raise JoinRefused("could not publish the run config to the DHT")
        self._check(mine, digest)  # a node with another config may have published at the same moment

    def _under_way(self) -> int | None:
        rounds = [v for v in self.transport._read(self._progress_key).values() if isinstance(v, int)]
        return max(rounds) if rounds else None

    # -- ControlPlane -------------------------------------------------------------------------------------
    def join(self, identity: Identity) -> JoinInfo:
        self._agree(identity)
        shard = shard_of(self.name, self.settings.num_shards)
        at = self._under_way()
        if at is not None:
            # mid-way: the state comes first (fetch_state), heartbeats only once we can train from it; we want the
            # state after the round that is open now (the donors snapshot at their next boundary)
            self._round = at + 1
            return JoinInfo(shard, self.settings.num_shards, at + 1, at)
        self.transport.join(0)  # heartbeats start: the peers now wait for our frame in every round
        until = self.clock.now() + self.settings.start_timeout_s
        while len(self.transport.live_peers() | {self.name}) < self.settings.min_nodes:
            if self._under_way() is not None:
                break  # the others started without waiting for more (we still joined before round 0 closed)
            if self.clock.now() >= until:
                raise JoinRefused(f"fewer than {self.settings.min_nodes} peers came within "
                                  f"{self.settings.start_timeout_s:.0f} s")
            if self.clock.sleep(0.2, self.stop):
                raise Stopped()
        return JoinInfo(shard, self.settings.num_shards, 0, 0)

    def exchange(self, submission: Submission, timeout_s: float) -> RoundResult:
        round_ = submission.round
        if not self.transport.joined:  # resumed from a checkpoint without fetching state: be waited for from now
            self.transport.join(round_)
        # mark the run as under way before offering the frame, so a later node knows to fetch the state (the
        # first round's mark is awaited; later ones go out beside the frame: the run is marked by then)
        store = self.transport._store if round_ == 0 else self.transport._store_later
        store(self._progress_key, self.name, round_, get_dht_time() + CONFIG_TTL_S)
        self.transport.submit(round_, submission.frame, submission.fingerprint)
        result = self.transport.collect(round_, timeout_s)
        if self.stop.is_set():
            raise Stopped()  # shutting down: the round goes on without us (as in coordinator mode)
        self._round = round_ + 1 if result.committed else round_
        # the round the others are in: a node that was frozen or cut off learns that it fell behind (the daemon
        # then fetches the state instead of replaying rounds whose frames may be gone)
        self._run_round = max(self._run_round, self._under_way() or 0)
        return result

    def observe(self, round_: int, timeout_s: float, fingerprint: str = "") -> RoundResult:
        if self.transport.from_round <= round_:  # the others must not wait for a frame from us in this round
            self.transport.join(round_ + 1)
        result = self.transport.collect(round_, timeout_s, fingerprint=fingerprint)
        if self.stop.is_set():
            raise Stopped()
        self._run_round = max(self._run_round, self._under_way() or 0)
        return result

    def round_started(self, round_: int) -> bool | None:
        return None  # members wait the longest wait for a joiner's first round instead (see dht.py, _close_group)

    def fetch_state(self, after_round: int | None, timeout_s: float) -> StateBlob | None:
        """Download the newest state of at least ``after_round + 1`` rounds from the peers, then start heartbeats
        from that round. None when no peer offered one within ``timeout_s``."""
        need = self._round if after_round is None else after_round + 1  # never older than what we have seen
        got = self.transport.state.fetch(need, timeout_s, cancelled=self.stop)
        if self.stop.is_set():
            raise Stopped()
        if got is None:
            return None
        served = ", ".join(f"{d}: {n} B" for d, n in sorted(got.per_donor.items()))
        log.info("[node=%s] fetched the state after %d rounds (%d bytes) in %.2f s (transfer %.2f s) from %d donors "
                 "(%s)", self.name, got.offer.committed, got.offer.size, got.seconds, got.transfer_s,
                 sum(1 for n in got.per_donor.values() if n), served)
        self._round = got.offer.committed
        self.transport.join(got.offer.committed)
        return StateBlob(got.offer.committed, got.blob, got.offer.fingerprint)

    def offer_state(self, committed: int, fingerprint: str, make_blob: Callable[[], bytes]) -> None:
        self.transport.offer_state(committed, fingerprint, make_blob)

    def leave(self, reason: str) -> None:
        log.info("[node=%s] leaving the DHT run (%s)", self.name, reason)
        self.transport.leave()

    def close(self) -> None:
        self.transport.close()
