"""``ControlPlane`` with no server: peers agree on the run through a hivemind DHT and exchange frames with
``DhtTransport`` (leaderless rounds, frames pulled peer to peer).

Run agreement. There is no coordinator to hand out the run, so every node brings the run file, which its authority
signed (``lowband run init``; ``dht_trust``): the run config, the task fingerprint, the model digest and the DHT
settings below. A node checks its own run file and data against that signature before it publishes anything; if they
differ it is refused (exit 3) with the differing fields, read from the signed record another node published under
``{run_id}/config``. Records there without the authority's signature are ignored and counted: nobody can lock a run
out by publishing first.

Joining. In a closed run a node needs the authority's grant for its key and name; a name held by another live key is
refused (names are labels, keys are identities); a run with ``max_nodes`` live members is full. The node then claims
a data shard that no live member holds (its key's preferred shard if free, else the lowest free one; of two nodes
claiming one at once, the later to join moves — ``dht_members``) and holds it with "joining" heartbeats.

Where to start, and ``min_nodes``. The round the run is in is what more than half of the other *live* members
entered (``dht_quorum.run_progress``):

- other members are live: the node joins at that round. A node restarted from its workdir whose checkpoint is at that
  round resumes at once; any other fetches the state the members hold now (they offer it mid-round), not the state
  after a round that — with ``min_nodes`` members short — cannot commit without it. (Asking for the latter is what
  deadlocked a two-node run with ``min_nodes = 2`` after one node restarted.)
- none is live (a new run, or every node restarted): each resumes from its own checkpoint (or round 0) and waits
  until ``min_nodes`` peers are live before its first round, as a coordinator waits before round 0.

A round with fewer than ``min_nodes`` announcements stays open (``dht_agreement.close_group``), as in coordinator
mode, instead of failing and being retried as fast as the node trains. A node that is behind the run (a round
without a quorum, while more than half of the others are in a later one) fetches the state.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from hivemind.utils import get_dht_time

from node.clock import SYSTEM_CLOCK, Clock
from node.config import RunConfig, diff_configs
from node.errors import ConfigError
from node.identity import NodeKey, key_id
from node.membership import DeadlinePolicy
from node.transport.control import Identity, JoinInfo, JoinRefused, Stopped
from node.transport.dht import DhtTransport
from node.transport.dht_agreement import Announcement
from node.transport.dht_members import CONFIG_TTL_S, pick_shard
from node.transport.dht_trust import RunAuthority, RunTrust, run_record, unpack_record
from node.transport.messages import RoundResult, RoundStatus, StateBlob, Submission

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DhtSettings:
    """How to reach the DHT, who this node is, and the run-file knobs that serverless rounds use."""

    initial_peers: tuple[str, ...]
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    nat: bool = False  # hivemind's nat_port_map / auto_nat / use_relay, all together
    identity_path: str | None = None
    client_mode: bool = False  # hivemind client mode: for a peer behind NAT (reached through relays)
    announce_maddrs: tuple[str, ...] = ()  # what the other peers dial, if not the listen addresses
    num_shards: int = 64  # also max_nodes: one shard per seat
    min_nodes: int = 1
    heartbeat_s: float = 1.0
    round_wait_s: float = 30.0  # how long a round stays open after its first frame for the stragglers
    start_timeout_s: float = 3600.0  # the most a node waits for min_nodes peers before its first round
    deadline: DeadlinePolicy | None = None  # adaptive round wait (None: the fixed round_wait_s)
    state_chunk_bytes: int = 4 << 20  # joiners fetch the state in chunks of this size, spread over donors
    authority: RunAuthority | None = None  # the run file's [authority] (required)
    key: NodeKey | None = None  # this node's key (its workdir's node.key); None: a fresh one, held in memory
    grant: bytes = b""  # the authority's grant for this node's key and name (closed runs)
    # sharded rounds (run file [dht], rounds.aggregate_codec; node/transport/dht_sharded.py); None: never
    shard_above: int | None = None
    owner_wait_s: float = 10.0
    aggregate_codec: str = "identity"
    sharding: dict[str, Any] = field(default_factory=dict)  # RunFile.dht_record(): signed with the run
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def default_signals() -> Iterator[None]:
    """Fork hivemind's DHT process with default SIGTERM/SIGINT handling (``dht_process`` then installs its own):
    with the daemon's "set the stop event" handler inherited, a signal could reach it before it does."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be changed from the main thread (and were not installed elsewhere)
        return
    saved = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


class DhtControl:
    """``clock``: what the waits are decided on — the start wait for ``min_nodes`` peers here, and every wait of the
    transport's rounds and state fetches."""

    def __init__(self, run: RunConfig, settings: DhtSettings, name: str, stop: threading.Event,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        if settings.authority is None:
            raise ConfigError("a serverless run needs its authority's signature (the run file's [authority], written "
                              "by `lowband run init`)")
        self.where = "dht"
        self.run, self.settings, self.name, self.stop, self.clock = run, settings, name, stop, clock
        self.lost = threading.Event()  # a DHT peer has no lease to lose: never set
        self._round = 0
        self._run_round = 0  # the highest round the run was seen in
        self.trust = RunTrust(run.run_id, settings.key or NodeKey.generate(), name, settings.authority,
                              settings.grant, max_nodes=settings.num_shards)
        with default_signals():
            self.transport = DhtTransport.create(
                run.run_id, name, list(settings.initial_peers), host_maddrs=list(settings.host_maddrs),
                nat_port_map=settings.nat, auto_nat=settings.nat, use_relay=settings.nat,
                identity_path=settings.identity_path, client_mode=settings.client_mode,
                announce_maddrs=settings.announce_maddrs, trust=self.trust, max_round=run.rounds,
                round_wait_s=settings.round_wait_s, heartbeat_s=settings.heartbeat_s, deadline=settings.deadline,
                state_chunk_bytes=settings.state_chunk_bytes, cancel=stop, min_members=settings.min_nodes,
                clock=clock, shard_above=settings.shard_above, owner_wait_s=settings.owner_wait_s,
                aggregate_codec=settings.aggregate_codec, **settings.extra)
        for maddr in self.transport.visible_maddrs():  # other nodes can bootstrap through any of these
            log.info("[node=%s] DHT address %s", name, maddr)
        log.info("[node=%s] key id %s; run authority %s (%s run)", name, self.trust.key.key_id,
                 settings.authority.key_id, "open" if settings.authority.open_run else "closed")
        self._key = f"{run.run_id}/config"

    @property
    def current_round(self) -> int:
        return max(self._round, self._run_round)

    def get_run_config(self) -> RunConfig:
        return self.run  # the local run file is the only source; agreement is checked in join()

    # -- agreement ----------------------------------------------------------------------------------------
    def _record(self, identity: Identity) -> str:
        """The run record this node's run file and data give (what the authority must have signed)."""
        s = self.settings
        assert s.authority is not None
        return run_record(json.loads(identity.config_json), identity.task_fingerprint, identity.model_digest,
                          num_shards=s.num_shards, min_nodes=s.min_nodes, open_run=s.authority.open_run,
                          sharding=s.sharding)

    def _signed_records(self) -> list[dict[str, Any]]:
        """The run records in the DHT that the run's authority signed (whoever stored them: the signature is what
        counts); the others are counted as rejected."""
        authority = self.settings.authority
        assert authority is not None
        found = []
        for public, raw in self.transport._read_raw(self._key).items():
            obj = unpack_record(raw) if isinstance(raw, bytes) else None
            body = obj[3] if obj is not None and obj[0] == self.run.run_id else None
            if not (isinstance(body, list) and len(body) == 2 and isinstance(body[0], str)
                    and isinstance(body[1], bytes) and authority.signed(self.run.run_id, body[0], body[1])):
                self.trust.rejections.add("config", "not signed by the run's authority", (public, raw))
                continue
            try:
                found.append(json.loads(body[0]))
            except ValueError:
                self.trust.rejections.add("config", "malformed run record", (public, raw))
        return found

    def _agree(self, identity: Identity) -> None:
        authority = self.settings.authority
        assert authority is not None
        text = self._record(identity)
        if not authority.signed(self.run.run_id, text):
            signed = self._signed_records()
            if signed:
                diffs = diff_configs(json.loads(text), signed[0])
                raise JoinRefused("this node's run differs from the run its authority signed (this node vs the run): "
                                  f"{'; '.join(diffs) or 'same fields, another signature'}")
            raise JoinRefused(f"this node's run file or data differ from what the run's authority (key id "
                              f"{authority.key_id}) signed, and no node has published the signed run yet: use the "
                              "authority's run file unchanged (`lowband run init` signs it)")
        self._signed_records()  # counts the records without the authority's signature (they decide nothing)
        # publish the signed record: a node with an edited run file learns from it which fields differ
        self.transport._store(self._key, [text, authority.signature], get_dht_time() + CONFIG_TTL_S)

    def _admit(self) -> None:
        """Refuse a node without a grant, a name another live key holds, a full run."""
        trust, me = self.trust, self.trust.key.public
        if trust.closed and not trust.granted(me, self.name, trust.grant):
            raise JoinRefused(f"this node's key (id {trust.key.key_id}) has no grant to join run {self.run.run_id!r} "
                              f"as {self.name!r}: its authority grants it with `lowband run grant --run RUN.toml "
                              f"--authority-key AUTHORITY.key --public {me.hex()} --name {self.name}` (put the "
                              "printed grant in the node's workdir as grant.toml)")
        self.transport.heartbeats()  # refreshes the roster of live members
        holder = trust.holder(self.name)
        if holder is not None and holder != me:
            raise JoinRefused(f"the name {self.name!r} is held by a live member with another key (id "
                              f"{key_id(holder)}); names are labels, keys are identities: start this node "
                              "with another --name, or from the workdir that holds that key")
        seated = [m for m in trust.ranked() if m.key != me]
        if len(seated) >= self.settings.num_shards:
            raise JoinRefused(f"the run is full: {len(seated)} live members, max_nodes {self.settings.num_shards}")

    def _claim_seat(self, since: int) -> int:
        """A data shard no live member holds, claimed with "joining" heartbeats; of two nodes that claimed the same
        one at once, the later to join (ties: the larger key) moves. Raises JoinRefused when the run is full."""
        t, me = self.transport, self.trust.key.public
        shard: int | None = None
        for _ in range(self.settings.num_shards + 1):
            beats = t.heartbeats()
            others = {m.name: m for m in self.trust.ranked() if m.key != me and m.name in beats}
            taken = {beats[n].shard for n in others}
            if shard is None or shard in taken:
                better = {beats[n].shard for n, m in others.items() if (m.since, m.key) < (since, me)}
                if shard is not None and shard not in better:
                    return shard  # the others that share it joined after us: they move
                shard = pick_shard(me, self.settings.num_shards, taken)
                if shard is None:
                    raise JoinRefused(f"the run is full: every one of its {self.settings.num_shards} shards is held")
                t.claim(shard, since)
                if self.clock.sleep(self.settings.heartbeat_s, self.stop):  # let claims made at once cross
                    raise Stopped()
                continue
            if not self.trust.within_max(me):
                raise JoinRefused(f"the run is full: max_nodes {self.settings.num_shards} reached while joining")
            return shard
        raise JoinRefused("could not find a free data shard (too many nodes joining at once): start again")

    def _decided(self, round_: int) -> bool:
        """Whether ``round_`` has an outcome its members' have-lists support (from any reference)."""
        t = self.transport
        seen, peers = t._read_many([f"{self.run.run_id}/round/{round_}", t.peers_key])
        announced = {s: a for s, a in ((s, Announcement.parse(v)) for s, v in (seen or {}).items()) if a is not None}
        live = t.live_peers(records=peers or {})
        return t._read_outcome(round_, announced, "", len(set(announced) & live) or len(announced)) is not None

    # -- ControlPlane -------------------------------------------------------------------------------------
    def join(self, identity: Identity) -> JoinInfo:
        self._agree(identity)
        self._admit()
        at = self.transport.run_round()
        if at is not None and self._decided(at):
            at += 1  # the members committed the round they entered and are training the next one
        shard = self._claim_seat(at or 0)
        n = self.settings.num_shards
        if at is not None:
            # others are live: join at the round they are in (see the module docstring); heartbeats say "live" from
            # the first exchange, or once the state is fetched
            self._round = self._run_round = at
            return JoinInfo(shard, n, at, at)
        self.transport.join(0)  # heartbeats say "live": the peers now wait for our frame in every round
        until = self.clock.now() + self.settings.start_timeout_s
        # a peer still "joining" counts: after every node restarted, one may have taken a dying peer's last heartbeat
        # for a live run and be fetching the state, which it gets from us only once we start our round
        while len(self._present() | {self.name}) < self.settings.min_nodes:
            if self.transport.run_round() is not None:
                break  # the others started without waiting for more (we still joined before their round closed)
            if self.clock.now() >= until:
                raise JoinRefused(f"fewer than {self.settings.min_nodes} peers came within "
                                  f"{self.settings.start_timeout_s:.0f} s")
            if self.clock.sleep(0.2, self.stop):
                raise Stopped()
        return JoinInfo(shard, n, 0, 0)

    def _present(self) -> set[str]:
        """The peers live or joining (not those that left or whose heartbeat expired)."""
        return {n for n, hb in self.transport.heartbeats().items() if hb.status != "left"}

    def exchange(self, submission: Submission, timeout_s: float) -> RoundResult:
        round_ = submission.round
        if not self.transport.joined:  # resumed from a checkpoint without fetching state: be waited for from now
            self.transport.join(round_)
        # mark the round as entered before offering the frame, so a later node knows where the run is (the first
        # round's mark is awaited; later ones go out beside the frame)
        self.transport.record_progress(round_, wait=round_ == 0)
        self.transport.submit(round_, submission.frame, submission.fingerprint)
        result = self.transport.collect(round_, timeout_s)
        if self.stop.is_set():
            raise Stopped()  # shutting down: the round goes on without us (as in coordinator mode)
        self._round = round_ + 1 if result.committed else round_
        # the round the others are in: a node that was frozen or cut off learns that it fell behind (the daemon
        # then fetches the state instead of replaying rounds whose frames may be gone)
        ahead = self.transport.run_round()
        self._run_round = max(self._run_round, ahead or 0)
        if not result.committed and ahead is not None and ahead > round_:
            self._round = ahead  # the state to fetch: the one the members hold now
            if not result.state_needed:
                result = dataclasses.replace(result, status=RoundStatus.RESULT_GONE, reason=f"{result.reason}; the "
                                             f"run is at round {ahead}: fetching the state")
        return result

    def observe(self, round_: int, timeout_s: float, fingerprint: str = "") -> RoundResult:
        if self.transport.from_round <= round_:  # the others must not wait for a frame from us in this round
            self.transport.join(round_ + 1)
        result = self.transport.collect(round_, timeout_s, fingerprint=fingerprint)
        if self.stop.is_set():
            raise Stopped()
        self._run_round = max(self._run_round, self.transport.run_round() or 0)
        return result

    def round_started(self, round_: int) -> bool | None:
        return None  # members wait the longest wait for a joiner's first round instead (see dht.py, _close_group)

    def fetch_state(self, after_round: int | None, timeout_s: float, at_least: int = 0) -> StateBlob | None:
        """Download the newest state of at least ``after_round + 1`` rounds (default: the round the run is in) from
        the peers, then heartbeat "live" from that round. None when no peer offered one within ``timeout_s``."""
        need = max(at_least, self._round if after_round is None else after_round + 1)  # never older than we hold
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
