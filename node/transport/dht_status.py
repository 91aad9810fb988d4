"""``lowband status --dht``: one look at a serverless run, read from its DHT records.

A client-mode DHT peer (it stores nothing and writes nothing) reads the run's records with the same checks a member
applies — signatures, grants, name clashes, ``max_nodes``, supported outcomes — and prints the members (key id, last
heartbeat, status, shard, how many records each has ignored), the round the run is in, the recent rounds' outcomes,
and what this reader itself ignored.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from hivemind.utils import get_dht_time

from node.identity import NodeKey, key_id
from node.runfile import RunFile
from node.transport.dht_agreement import Announcement, parse_haves
from node.transport.dht_trust import RunAuthority, RunTrust

log = logging.getLogger(__name__)
RECENT = 5


@dataclass
class MemberRow:
    name: str
    key_id: str
    status: str
    shard: int
    from_round: int
    since: int
    last_heartbeat_s: float | None  # seconds ago (from the record's expiration)
    rejected: int


@dataclass
class RoundRow:
    round: int
    announced: list[str]
    outcome: str  # "committed by X", "undecided", ...
    members: list[str] = field(default_factory=list)


@dataclass
class DhtStatus:
    run_id: str
    authority: str
    open_run: bool
    round: int | None
    members: list[MemberRow]
    rounds: list[RoundRow]
    rejected: dict[str, int]

    def text(self) -> str:
        lines = [f"run {self.run_id} (authority {self.authority}, {'open' if self.open_run else 'closed'} run)",
                 f"open round: {'unknown (no live member recorded one)' if self.round is None else self.round}",
                 f"members ({sum(1 for m in self.members if m.status == 'live')} live):"]
        for m in self.members:
            beat = "?" if m.last_heartbeat_s is None else f"{m.last_heartbeat_s:.1f} s ago"
            lines.append(f"  {m.name:<16} key {m.key_id}  {m.status:<7} shard {m.shard:<3} from round {m.from_round:<5}"
                         f" last heartbeat {beat}, {m.rejected} records ignored")
        lines.append("recent rounds:")
        for r in self.rounds:
            lines.append(f"  round {r.round}: {r.outcome}; announced by {', '.join(r.announced) or 'nobody'}"
                         + (f"; frames of {', '.join(r.members)}" if r.members else ""))
        lines.append("records this reader ignored: " + (", ".join(f"{k} ({n})" for k, n in self.rejected.items())
                                                        or "none"))
        return "\n".join(lines)


def read_status(initial_peers: Sequence[str], run_file: RunFile, host_maddrs: Sequence[str], nat: bool) -> DhtStatus:
    from node.transport.dht import DhtTransport

    cfg, mp = run_file.run, run_file.membership
    authority = RunAuthority.from_section(run_file.authority)
    trust = RunTrust(cfg.run_id, NodeKey.generate(), "status", authority, max_nodes=mp.max_nodes)
    t = DhtTransport.create(cfg.run_id, "status", list(initial_peers), host_maddrs=list(host_maddrs),
                            nat_port_map=nat, auto_nat=nat, use_relay=nat, client_mode=True, trust=trust,
                            heartbeat_s=mp.heartbeat_s, max_round=cfg.rounds)
    try:
        return _read(t, run_file, authority)
    finally:
        t.close(announce_leave=False)


def _read(t: Any, run_file: RunFile, authority: RunAuthority) -> DhtStatus:
    hb_s = run_file.membership.heartbeat_s
    found = t._dht_future(t.dht.get, t.peers_key, latest=True)  # with expirations: when each heartbeat was sent
    expirations = {k: v.expiration_time for k, v in found.value.items()} if found and isinstance(found.value, dict) \
        else {}
    beats = t.heartbeats()
    keys = {m.name: m.key for m in t.trust.ranked()}
    members = []
    now = get_dht_time()
    for name, hb in sorted(beats.items()):
        key = keys.get(name)
        exp = expirations.get(key) if key is not None else None
        members.append(MemberRow(name, key_id(key) if key else "?", hb.status, hb.shard, hb.from_round, hb.since,
                                 None if exp is None else max(0.0, now - (exp - 3 * hb_s)), hb.rejected))
    at = t.run_round(peers={n: hb.encode() for n, hb in beats.items()})
    live = {n for n, hb in beats.items() if hb.status == "live"}
    rounds = []
    if at is not None:
        for r in range(max(0, at - RECENT + 1), at + 1):
            key = f"{t.run_id}/round/{r}"
            seen, haves, done = t._read_many([key, f"{key}/have", f"{key}/done"])
            parsed = {s: Announcement.parse(v) for s, v in (seen or {}).items()}
            announced = {s: a for s, a in parsed.items() if a is not None}
            voters = len(set(announced) & live) or len(announced)
            outcome = t._supported(r, done or {}, parse_haves(haves or {}, announced), "", voters)
            if outcome is not None:
                rounds.append(RoundRow(r, sorted(announced), f"committed by {outcome.publisher}",
                                       sorted(s for s, _ in outcome.pairs)))
            else:
                rounds.append(RoundRow(r, sorted(announced), "open" if r == at else "not committed"))
    return DhtStatus(t.run_id, authority.key_id, authority.open_run, at, members, rounds, t.refresh_rejections())


def print_dht_status(initial_peers: Sequence[str], run_file: RunFile, *, as_json: bool = False,
                     host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",), nat: bool = False) -> int:
    status = read_status(initial_peers, run_file, host_maddrs, nat)
    print(json.dumps(asdict(status), indent=2) if as_json else status.text(), flush=True)
    return 0
