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
entered; a node that finds any such record before joining is refused: joining a run under way needs the global
state, which this serverless mode cannot serve yet (``fetch_state`` returns None).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from hivemind.utils import get_dht_time

from node.config import RunConfig, diff_configs
from node.transport.base import RoundResult
from node.transport.control import Identity, JoinInfo, JoinRefused, State, Stopped
from node.transport.dht import DhtTransport

log = logging.getLogger(__name__)
CONFIG_TTL_S = 7 * 24 * 3600.0  # outlives any run: a late node must still find what the run agreed on
MIDWAY = "joining a serverless run mid-way needs state transfer, not implemented yet"


@dataclass(frozen=True)
class DhtSettings:
    """How to reach the DHT, and the run-file knobs that serverless rounds use."""

    initial_peers: tuple[str, ...]
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    nat: bool = False  # hivemind's nat_port_map / auto_nat / use_relay, all together
    identity_path: str | None = None
    num_shards: int = 64
    min_nodes: int = 1
    heartbeat_s: float = 1.0
    round_wait_s: float = 30.0  # how long a round stays open after its first frame for the stragglers
    start_timeout_s: float = 3600.0  # the most a node waits for min_nodes peers before round 0
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
    def __init__(self, run: RunConfig, settings: DhtSettings, name: str, stop: threading.Event) -> None:
        self.where = "dht"
        self.run, self.settings, self.name, self.stop = run, settings, name, stop
        self.lost = threading.Event()  # a DHT peer has no lease to lose: never set
        self._round = 0
        with default_signals():
            self.transport = DhtTransport.create(
                run.run_id, name, list(settings.initial_peers), host_maddrs=list(settings.host_maddrs),
                nat_port_map=settings.nat, auto_nat=settings.nat, use_relay=settings.nat,
                identity_path=settings.identity_path, round_wait_s=settings.round_wait_s,
                heartbeat_s=settings.heartbeat_s, **settings.extra)
        self._key = f"{run.run_id}/config"
        self._progress_key = f"{run.run_id}/progress"

    @property
    def current_round(self) -> int:
        return self._round

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
        if not self.transport._store(self._key, digest, (text, get_dht_time()), get_dht_time() + CONFIG_TTL_S):
            raise JoinRefused("could not publish the run config to the DHT")
        self._check(mine, digest)  # a node with another config may have published at the same moment

    def _under_way(self) -> int | None:
        rounds = [v for v in self.transport._read(self._progress_key).values() if isinstance(v, int)]
        return max(rounds) if rounds else None

    # -- ControlPlane -------------------------------------------------------------------------------------
    def join(self, identity: Identity) -> JoinInfo:
        self._agree(identity)
        at = self._under_way()
        if at is not None:
            raise JoinRefused(f"{MIDWAY} (the run is at round {at})")
        self.transport.join()  # heartbeats start: the peers now wait for our frame in every round
        until = time.monotonic() + self.settings.start_timeout_s
        while len(self.transport.live_peers() | {self.name}) < self.settings.min_nodes:
            if self._under_way() is not None:
                break  # the others started without waiting for more (we still joined before round 0 closed)
            if time.monotonic() >= until:
                raise JoinRefused(f"fewer than {self.settings.min_nodes} peers came within "
                                  f"{self.settings.start_timeout_s:.0f} s")
            if self.stop.wait(0.2):
                raise Stopped()
        return JoinInfo(shard_of(self.name, self.settings.num_shards), self.settings.num_shards, 0, 0)

    def exchange(self, round_: int, frame: bytes, timeout_s: float, loss: float, own_name: str) -> RoundResult:
        # mark the run as under way before offering the frame, so no later node joins without the state
        self.transport._store(self._progress_key, self.name, round_, get_dht_time() + CONFIG_TTL_S)
        result = self.transport.exchange(round_, frame, timeout_s)
        self._round = round_ + 1 if result.committed else round_
        return result

    def fetch_state(self, after_round: int | None, timeout_s: float) -> State | None:
        return None  # no peer serves the global state yet (see the module docstring)

    def leave(self, reason: str) -> None:
        log.info("[node=%s] leaving the DHT run (%s)", self.name, reason)
        self.transport.leave()

    def close(self) -> None:
        self.transport.close()
