"""The coordinator's handlers: plain methods over its state; the gRPC servicer only translates.

One lock guards membership, the open round and results; collectors wait on their own events, set when a round
commits or the call is cancelled. Membership lives here (``CoordinatorCore``); the rounds — uploads, closing,
the idempotent commit, results — in ``coordinator/rounds.py`` (``Rounds``, its base class).

Identity: a member is a node key (node/identity.py). Join checks the join token, every field's bounds, the key's
signature over (run id, name, key, timestamp) within ``skew_s`` of this machine's clock, then the run's config.
The same name with the same key replaces the live session at once; the same name with another key is refused — for
the whole run, live or not: a name is bound to the first key that joined under it (coordinator/names.py).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable

from coordinator.bounds import check_join, check_node_id, check_token, printable
from coordinator.errors import Conflict, Evicted, Full, Invalid, Refused, ResumeMismatch, Unauthorized, UnknownNode
from coordinator.names import Names
from coordinator.rounds import STATE_CHUNK, Chunk, Committed, Rounds, Waiter  # noqa: F401  (re-exported)
from coordinator.store import Store
from node import membership as policy
from node.config import diff_configs
from node.identity import key_id, verify
from node.membership import AdmitKind, Member
from node.runfile import RunFile
from node.transport.grpc_auth import join_message

log = logging.getLogger(__name__)
#: 3: config hash over RFC 8785 canonical JSON; status codes one meaning each (INVALID_ARGUMENT for malformed
#: input, ABORTED for "submit again", OUT_OF_RANGE only for byte offsets); GetRun checks the version too
PROTOCOL_VERSION = 3
MAX_DIFFS = 20  # differing config fields named in a refusal


def check_protocol(version: int) -> None:
    """Raises Refused unless ``version`` is the one this coordinator speaks (0, unset, is refused too)."""
    if version != PROTOCOL_VERSION:
        raise Refused(f"protocol version {version} is not supported; this coordinator speaks {PROTOCOL_VERSION}")


class CoordinatorCore(Rounds):
    """``clock``: monotonic seconds for leases and deadlines; ``wall``: unix seconds, for the timestamps nodes
    sign; ``skew_s``: how far a node's timestamp may be off ``wall``."""

    def __init__(self, cfg: RunFile, store: Store, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, skew_s: float = 60.0) -> None:
        self.wall, self.skew_s = wall, skew_s
        self.lock = threading.RLock()
        super().__init__(cfg, store, clock)
        self.members: dict[str, Member] = store.load_members(policy.restored_heartbeat(clock(), cfg.membership))
        for m in self.members.values():  # a restart must not make everyone look idle
            m.active_round = m.contributed_round = self.open_round - 1
        self.members_dirty = False
        self.names = Names(store.load_names())  # name → the first key that joined under it; evicted keys
        for m in self.members.values():  # members of a state dir from before names were bound hold theirs
            if m.name not in self.names.bound:
                self.names.bind(m.name, m.public_key, wall())
        if self.names.dirty:
            self._save_members()
        self.join_signatures: OrderedDict[bytes, float] = OrderedDict()  # replay window of Join signatures
        self.prefetched: OrderedDict[bytes, float] = OrderedDict()  # key → when it downloaded the state before Join

    # -- run and membership --------------------------------------------------------------------------
    def run_info(self, protocol_version: int, read_token: str = "") -> dict[str, Any]:
        """GetRun. Raises Refused for another protocol version (checked first: a client of another version learns
        that before anything else), Unauthorized for a missing or wrong read token."""
        check_protocol(protocol_version)
        self.check_read(read_token)
        return {"run_id": self.cfg.run.run_id, "config_json": json.dumps(self.cfg.run.to_dict()),
                "config_hash": self.config_hash, "task_fingerprint": self.task.fingerprint,
                "model_digest": self.model_digest, "protocol_version": PROTOCOL_VERSION}

    def check_read(self, token: str) -> None:
        """GetRun and Status: open when the run has neither a read token nor a join token; otherwise either."""
        check_token("read_token", token)
        mp = self.cfg.membership
        wanted = [t for t in (mp.read_token, mp.join_token) if t]
        if wanted and not any(secrets.compare_digest(token.encode(), t.encode()) for t in wanted):
            raise Unauthorized("this run needs its read token (or join token) to be read: --read-token or "
                               "$LOWBAND_READ_TOKEN")

    def join(self, name: str, protocol_version: int, config_json: str, config_hash: str, task_fingerprint: str,
             digest: str, capabilities: Iterable[str], join_token: str, public_key: bytes = b"",
             signature: bytes = b"", timestamp_ms: int = 0) -> dict[str, Any]:
        """Admit a node. Raises Refused (protocol; config, config hash, task or model: every difference named at
        once), Unauthorized (token, signature, timestamp, replay), Invalid (a field out of bounds, config_json not a JSON
        object), Evicted, Conflict (name taken by another key) or Full."""
        mp = self.cfg.membership
        check_protocol(protocol_version)
        self._authorize(join_token)
        caps = check_join(name, config_json, config_hash, task_fingerprint, digest, capabilities, public_key,
                          signature)
        self._check_join_signature(name, public_key, signature, timestamp_ms)
        evicted = self._was_evicted(name, public_key)
        if evicted:
            raise Evicted(f"{name} (key {key_id(public_key)}) was evicted from this run: {evicted}")
        differences = self._differences(config_json, config_hash, task_fingerprint, digest)
        if differences:
            raise Refused("this node differs from the run (node vs run): " + "; ".join(differences))
        with self.lock:
            now = self.clock()
            self.names.check(name, public_key)  # first: waiting for a live holder's lease would not help
            admission = policy.admit(self.members, name, mp, public_key, now, self.open_round)
            if not admission.act:
                raise (Full if admission.kind is AdmitKind.FULL else Conflict)(admission.reason)
            # A node joining before anyone submitted starts with this round; later joiners with the next one.
            # Before the run has started (see _waiting_to_start) every joiner enters round 0. (Decided before a
            # replaced session leaves: a payload it sent keeps counting, and the node never sends a second one.)
            # A departed member's payload keeps counting too: a joiner enters the open round only while the round has
            # room for it, so a round never holds more than max_nodes payloads (each member reads at most that many).
            contributors = {m.name for nid, m in self.members.items() if nid != admission.other}
            room = len(contributors | set(self.submitter_names.values()) | {name}) <= mp.max_nodes
            first = (self.open_round if room and ((not self.submitted and not self.uploads)
                                                  or self._waiting_to_start())
                     else self.open_round + 1)
            shard = None
            if admission.other is not None:
                old = self.members[admission.other]
                if admission.kind is AdmitKind.REPLACED:
                    shard = old.shard  # the same node keeps its data shard
                self._drop(admission.other, admission.reason, save=False)
            if shard is None:
                shard = policy.free_shard(self.members.values(), mp.max_nodes)
            assert shard is not None, "admit() bounds members by max_nodes"
            node_id = secrets.token_hex(16)
            if admission.other is not None and admission.other in self.submitted:
                # the replaced session's payload is the name's: the new session holds it (a repeat of it is taken as
                # one, another frame refused) and the round does not wait for a second payload from this name
                for held in (self.submitted, self.submitter_names, self.submitter_keys):
                    if admission.other in held:
                        held[node_id] = held.pop(admission.other)
            fetched = self.prefetched.pop(public_key, None)
            self.members[node_id] = Member(node_id, name, first, shard, time.time(), now, tuple(caps),
                                           public_key=public_key, contributed_at=now, active_round=first - 1,
                                           holds_state=fetched is not None and now - fetched < 3600)
            self.names.bind(name, public_key, self.wall())
            self._save_members()
            log.info("[round=%d] join %s key %s (shard %d, first round %d)%s", self.open_round, name,
                     key_id(public_key), shard, first, "" if admission.kind is AdmitKind.ADMITTED
                     else f": {admission.reason}")
            return {"node_id": node_id, "lease_ms": int(mp.lease_s * 1000),
                    "heartbeat_interval_ms": int(mp.heartbeat_s * 1000), "current_round": self.open_round,
                    "first_round": first, "committed_rounds": self.reference.committed_rounds,
                    "config_json": json.dumps(self.cfg.run.to_dict()), "shard": shard, "num_shards": mp.max_nodes,
                    "replaced": admission.kind is AdmitKind.REPLACED,
                    "upload_go": True}  # the guard answers every Submit with "go" (coordinator/guard.py)

    def _differences(self, config_json: str, config_hash: str, task_fingerprint: str, digest: str) -> list[str]:
        """Every way a joining node differs from the run, each named (a node fixes all of them in one go), or [].
        Raises Invalid when ``config_json`` is not a JSON object (malformed, not a difference)."""
        out = []
        try:
            theirs = json.loads(config_json) if config_json else None
        except json.JSONDecodeError as exc:
            raise Invalid(f"config_json: not valid JSON: {exc}") from None
        if theirs is not None:
            if not isinstance(theirs, dict):
                raise Invalid("config_json: must be a JSON object (the node's RunConfig)")
            diffs = diff_configs(theirs, self.cfg.run.to_dict())
            more = [f"and {len(diffs) - MAX_DIFFS} more config fields"] if len(diffs) > MAX_DIFFS else []
            out += [f"config {printable(d, 160)}" for d in diffs[:MAX_DIFFS]] + more
        if config_hash != self.config_hash:
            out.append(f"config hash {config_hash} vs {self.config_hash}")
        if task_fingerprint != self.task.fingerprint:
            out.append(f"task fingerprint {task_fingerprint[:16]} vs {self.task.fingerprint[:16]} (different data, e.g. "
                       "another Python version's standard library, or task parameters)")
        if digest != self.model_digest:
            out.append(f"model digest {digest} vs {self.model_digest} (the model's tensor names or shapes)")
        return out

    def _check_join_signature(self, name: str, public_key: bytes, signature: bytes, timestamp_ms: int) -> None:
        off = timestamp_ms / 1000.0 - self.wall()
        if abs(off) > self.skew_s:
            raise Unauthorized(f"join timestamp is {off:+.0f} s off the coordinator's clock (allowed ±"
                               f"{self.skew_s:.0f} s): check this machine's clock (NTP)")
        if not verify(public_key, signature, join_message(self.cfg.run.run_id, name, public_key, timestamp_ms)):
            raise Unauthorized(f"join signature does not verify with key {key_id(public_key)} (for run "
                               f"{self.cfg.run.run_id!r}, name {name!r})")
        with self.lock:
            now = self.wall()
            while self.join_signatures and next(iter(self.join_signatures.values())) < now - 2 * self.skew_s:
                self.join_signatures.popitem(last=False)
            if signature in self.join_signatures:
                raise Unauthorized("replayed Join: this signature was already used")
            self.join_signatures[signature] = now
            while len(self.join_signatures) > 65536:
                self.join_signatures.popitem(last=False)

    def _was_evicted(self, name: str, public_key: bytes) -> str:
        """Why ``name`` or ``public_key`` was evicted ([recipe.reduce] evict_after), or "". Names are in the run's
        robust state, keys in the coordinator's name table (both survive a restart)."""
        with self.lock:
            robust = self.reference.robust
            record = robust.evicted(name) if robust is not None else None
            if record is not None:
                return f"at round {record.evicted_at}: {record.reason}"
            return self.names.evicted_keys.get(public_key, "")

    def _evict(self, name: str, why: str) -> None:
        """Drop every session of member ``name`` and refuse its key from now on; caller holds the lock."""
        for node_id in [nid for nid, m in self.members.items() if m.name == name]:
            if self.members[node_id].public_key:
                self.names.evict(self.members[node_id].public_key, why)
            self._drop(node_id, why, level=logging.WARNING)

    def _bound_keys(self, names: Iterable[str]) -> dict[str, bytes]:
        return self.names.keys_of(names)

    def _authorize(self, join_token: str) -> None:
        check_token("join_token", join_token)
        token = self.cfg.membership.join_token
        if token and not secrets.compare_digest(join_token.encode(), token.encode()):
            raise Unauthorized("join token missing or wrong for this run")

    def member_key(self, node_id: str) -> bytes | None:
        """The public key of a live member (read without the lock: one dict lookup; the guard calls it per call)."""
        m = self.members.get(node_id)
        return m.public_key if m is not None else None

    def _member(self, node_id: str) -> Member:
        m = self.members.get(node_id)
        if m is None:
            check_node_id(node_id)
            raise UnknownNode(f"unknown node id {node_id[:8]}…: never joined, left, or its lease expired; join again")
        return m

    def _drop(self, node_id: str, why: str, save: bool = True, level: int = logging.INFO) -> None:
        """Remove a member (its payload for the open round, if any, still counts); caller holds the lock."""
        m = self.members.pop(node_id)
        self.uploads.pop(node_id, None)
        self.observers.discard(node_id)
        log.log(level, "[round=%d] leave %s (key %s): %s", self.open_round, m.name, key_id(m.public_key), why)
        if save:
            self._save_members()

    def _save_members(self) -> None:
        try:
            self.store.save_members(self.members, self.names.pending())
            self.names.saved()
            self.members_dirty = False
        except (OSError, self.db_errors) as exc:
            self.members_dirty = True
            self.persistence.failed(self.clock(), "the members", exc)

    def heartbeat(self, node_id: str) -> dict[str, Any]:
        with self.lock:
            self._member(node_id).last_heartbeat = self.clock()
            return {"current_round": self.open_round, "committed_rounds": self.reference.committed_rounds,
                    "lease_ms": int(self.cfg.membership.lease_s * 1000)}

    def leave(self, node_id: str, reason: str) -> None:
        with self.lock:
            self._member(node_id)
            self._drop(node_id, printable(reason or "no reason given", 120))
            self._maybe_close()

    def tick(self) -> None:
        """Expire leases, evict idle members, retry a failed write, close a round whose deadline passed."""
        with self.lock:
            mp = self.cfg.membership
            for node_id, reason in policy.expired_members(self.clock(), self.members, mp):
                self._drop(node_id, f"lease expired: {reason}", level=logging.WARNING)
            self._maybe_close()
            for node_id, reason in policy.idle_members(self.open_round, self.members, mp):
                self._drop(node_id, f"evicted: {reason}", level=logging.WARNING)
            if (not self.persistence.ok or self.store.pending) and self.persistence.may_try(self.clock()):
                if self.members_dirty:
                    self._save_members()
                if self.store.flush() and not self.members_dirty and not self.commit_pending:
                    self.persistence.succeeded()
            self._maybe_close()

    # -- state ---------------------------------------------------------------------------------------
    def fetch_state(self, node_id: str, offset: int, join_token: str = "", public_key: bytes | None = None,
                    min_committed: int = 0, waiter: Waiter | None = None) -> Iterable[dict[str, Any]]:
        """The state blob from ``offset``, to a member, or (empty ``node_id``) to a node that has not joined yet but
        holds the run's join token and signed the request with ``public_key``: it downloads while it starts up,
        which on a slow link is most of a join. A download that reaches the end marks the node as holding the
        state (it may then earn a longer first-round wait, see ``newcomer_wait``). ``min_committed``: the oldest state
        the caller takes (capped at the committed rounds; see ``state_snapshot``). ``waiter.cancel()`` (the caller
        went away) ends a wait for a snapshot at once: raises Cancelled."""
        if node_id:
            with self.lock:
                self._member(node_id).transfers += 1
        else:
            self._authorize(join_token)
        try:
            committed, path, fingerprint = self.state_snapshot(at_least=min_committed, waiter=waiter)
            # the file is read chunk by chunk, never whole; an open file survives its pruning by a newer snapshot
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if offset > size:
                    raise ResumeMismatch(f"offset {offset} is past the end of the {size}-byte state")
                with self.lock:
                    if node_id in self.members:
                        self.members[node_id].bytes_out += size - offset
                for start in range(offset, max(size, offset + 1), STATE_CHUNK):
                    yield {"committed_rounds": committed, "total_size": size, "offset": start,
                           "data": os.pread(f.fileno(), STATE_CHUNK, start), "reference_fingerprint": fingerprint}
            with self.lock:
                if node_id in self.members:
                    self.members[node_id].holds_state = True
                    self.members[node_id].active_round = max(self.members[node_id].active_round, committed - 1)
                elif public_key is not None and not node_id:
                    self.prefetched[public_key] = self.clock()
                    while len(self.prefetched) > 4096:
                        self.prefetched.popitem(last=False)
        finally:
            if node_id:
                with self.lock:
                    if node_id in self.members:
                        self.members[node_id].transfers -= 1

    def status(self) -> dict[str, Any]:
        with self.lock:
            now = self.clock()
            robust = self.reference.robust
            return {"records": dict(robust.members) if robust is not None else {}, "run_id": self.cfg.run.run_id,
                    "recipe": self.cfg.run.recipe.name, "current_round": self.open_round,
                    "committed_rounds": self.reference.committed_rounds, "total_rounds": self.cfg.run.rounds,
                    "deadline_in_s": (self.deadline - now) if self.deadline is not None else -1.0,
                    "members": [m for m in self.members.values()], "recent": list(self.recent),
                    "reference_fingerprint": self.fingerprint(),
                    "submitted": sorted(self.members[n].name for n in self.submitted if n in self.members), "now": now,
                    "persistence_error": self.persistence.error}
