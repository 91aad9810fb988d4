"""Membership of a serverless run, as the DHT transport keeps it: heartbeats, seats and shards, progress.

- ``{run}/peers``, by member: (peer_id, status, from_round, shard, since, rejected), refreshed every ``heartbeat_s``
  (ttl 3×). ``status`` is "joining" while a node claims its seat and fetches the state (nobody waits for it), "live"
  once it takes part in the rounds from ``from_round`` on, "left" after an orderly leave. ``shard`` is its data
  shard, ``since`` the round it joined at (seats beyond ``max_nodes`` go to the latest to join, ties by key),
  ``rejected`` how many records it has ignored so far (``lowband status --dht`` shows it).
- ``{run}/progress``, by member: the round it entered. The round the run is in is what more than half of the other
  live members entered (``dht_quorum.run_progress``), never one member's word.

Reading the heartbeats also refreshes ``RunTrust``'s roster of live members, which decides name clashes (a name
belongs to the key that has held it longest among the live members) and ``max_nodes`` for every other record.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from hivemind.utils import get_dht_time

from node.transport.dht_agreement import live_members
from node.transport.dht_quorum import run_progress
from node.transport.dht_records import BoundedDht
from node.transport.dht_trust import Member

log = logging.getLogger(__name__)
CONFIG_TTL_S = 7 * 24 * 3600.0  # outlives any run: a late node must still find what the run agreed on
STATUSES = ("joining", "live", "left")
MAX_ROUND = 1 << 62


@dataclass(frozen=True)
class Heartbeat:
    peer_id: str
    status: str
    from_round: int
    shard: int
    since: int
    rejected: int

    @classmethod
    def parse(cls, value: Any) -> "Heartbeat | None":
        if not (isinstance(value, list) and len(value) == 6 and isinstance(value[0], str) and len(value[0]) <= 128
                and value[1] in STATUSES and all(isinstance(v, int) and not isinstance(v, bool) for v in value[2:])):
            return None
        hb = cls(*value)
        if not (0 <= hb.from_round <= MAX_ROUND and 0 <= hb.shard < 1 << 31 and 0 <= hb.since <= MAX_ROUND
                and 0 <= hb.rejected < 1 << 62):
            return None
        return hb

    def encode(self) -> list[Any]:
        return [self.peer_id, self.status, self.from_round, self.shard, self.since, self.rejected]


def preferred_shard(public: bytes, num_shards: int) -> int:
    """A node's first choice of data shard: from its key, so a restarted node keeps its shard when it is free."""
    return int.from_bytes(hashlib.sha256(public).digest()[:8], "big") % num_shards


def pick_shard(public: bytes, num_shards: int, taken: Iterable[int]) -> int | None:
    """The preferred shard if no live member holds it, else the lowest free one; None when all are taken."""
    busy = set(taken)
    first = preferred_shard(public, num_shards)
    if first not in busy:
        return first
    return next((s for s in range(num_shards) if s not in busy), None)


class DhtMembers(BoundedDht):
    """Mixed into ``DhtTransport`` (which sets these)."""

    peer_id: str
    heartbeat_s: float
    from_round: int
    joined: bool
    max_round: int
    _stop: threading.Event
    _hb: threading.Thread | None
    _hb_expiration: float
    _status: str
    shard: int
    since: int

    @property
    def peers_key(self) -> str:
        return f"{self.run_id}/peers"

    @property
    def progress_key(self) -> str:
        return f"{self.run_id}/progress"

    # -- reading ----------------------------------------------------------------------------------------------
    def _open_records(self, key: str, raw: dict[Any, Any]) -> dict[str, Any]:
        if key == self.peers_key:
            return self._open_heartbeats(raw)
        if key == self.progress_key:
            return self._open_progress(raw)
        return super()._open_records(key, raw)

    def _open_heartbeats(self, raw: Mapping[Any, Any]) -> dict[str, Any]:
        """name → heartbeat (as stored) of the members; refreshes the roster of live members first."""
        beats: list[tuple[bytes, str, Heartbeat]] = []
        for public, value in raw.items():
            got = self.trust.open_one("peers", public, value, roster=False)
            if got is None:
                continue
            hb = Heartbeat.parse(got[1])
            if hb is None:
                self.trust.rejections.add("peers", "malformed heartbeat", (public, value))
                continue
            beats.append((public, got[0], hb))
        self.trust.update_roster(Member(p, n, hb.since) for p, n, hb in beats if hb.status != "left")
        out: dict[str, Any] = {}
        for public, name, hb in sorted(beats, key=lambda b: b[2].status == "left"):  # a leave never hides a seat
            holder = self.trust.holder(name)
            if hb.status != "left" and holder != public:
                self.trust.rejections.add("peers", "name held by another member's key", (public, name))
            elif hb.status != "left" and not self.trust.within_max(public):
                self.trust.rejections.add("peers", "writer is beyond the run's max_nodes", (public, name))
            elif name not in out and holder in (None, public):
                out[name] = hb.encode()
        return out

    def _open_progress(self, raw: Mapping[Any, Any]) -> dict[str, Any]:
        out = {}
        for name, value in self.trust.open("progress", raw).items():
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= self.max_round:
                out[name] = value
            else:
                self.trust.rejections.add("progress", "round out of range", (name, repr(value)[:40]))
        return out

    def live_peers(self, round_: int | None = None, records: dict[str, Any] | None = None) -> set[str]:
        """Peers with a live heartbeat (that take part in ``round_``, if given). ``records``: the peers key, if the
        caller read it already."""
        return live_members(self._read(self.peers_key) if records is None else records, round_)

    def heartbeats(self) -> dict[str, Heartbeat]:
        """name → heartbeat of every member with a record (live, joining or left)."""
        parsed = {n: Heartbeat.parse(v) for n, v in self._read(self.peers_key).items()}
        return {n: hb for n, hb in parsed.items() if hb is not None}

    def run_round(self, progress: Mapping[str, int] | None = None,
                  peers: Mapping[str, Any] | None = None) -> int | None:
        """The round the run is in, by the other live members (``dht_quorum.run_progress``); None when none is."""
        if progress is None or peers is None:
            got_progress, got_peers = self._read_many([self.progress_key, self.peers_key])
            progress = progress if progress is not None else got_progress or {}
            peers = peers if peers is not None else got_peers or {}
        return run_progress(progress, live_members(peers) - {self.name})

    def record_progress(self, round_: int, wait: bool) -> None:
        (self._store if wait else self._store_later)(self.progress_key, round_, get_dht_time() + CONFIG_TTL_S)

    # -- writing ----------------------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        self._hb_expiration = get_dht_time() + 3 * self.heartbeat_s
        rejected = self.trust.rejections.total()
        self._store(self.peers_key, Heartbeat(self.peer_id, self._status, self.from_round, self.shard, self.since,
                                              rejected).encode(), self._hb_expiration)

    def _heartbeat_loop(self) -> None:
        beats = 0
        while not self._stop.wait(self.heartbeat_s):  # real time: the record expires in DHT time
            beats += 1
            if beats % 30 == 0:  # now and then: the validator's counts, so the heartbeat's total includes them
                self.refresh_rejections()
            self._heartbeat()

    def _beat(self, status: str) -> None:
        self._status = status
        self._heartbeat()
        if self._hb is None:
            self._hb = threading.Thread(target=self._heartbeat_loop, name=f"dht-hb-{self.name}", daemon=True)
            self._hb.start()

    def claim(self, shard: int, since: int) -> None:
        """Hold a seat and a data shard while joining: heartbeats say "joining" (nobody waits for this peer yet)."""
        self.shard, self.since = shard, since
        self._beat("live" if self.joined else "joining")

    def join(self, from_round: int | None = None) -> set[str]:
        """Heartbeats say "live": from now on the peers wait for this peer's frame in rounds ≥ ``from_round``."""
        if from_round is not None:
            self.from_round = from_round
        self.joined = True
        self._beat("live")
        return self.live_peers() | {self.name}

    def _announce_leave(self) -> None:
        # hivemind keeps the record with the later expiration: outlive the last heartbeat
        expiration = max(self._hb_expiration, get_dht_time()) + 1.0
        self._store(self.peers_key, Heartbeat(self.peer_id, "left", self.from_round, self.shard, self.since,
                                              self.trust.rejections.total()).encode(), expiration)
