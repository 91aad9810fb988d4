"""Membership and round-closing decisions as pure functions of (now, state, policy).

Nothing here reads a clock or mutates state: each function returns a decision and a human-readable
reason, which the caller logs. Tests drive them with a fake clock.
"""
from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from node.errors import ConfigError
from node.identity import key_id


#: a node name: a letter or digit, then letters, digits, '.', '_' or '-'; 1–64 characters (names reach logs,
#: Status and file names: no spaces, control characters or escapes)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_node_name(name: str) -> str | None:
    """None when ``name`` is a valid node name, else why not (for an INVALID_ARGUMENT or a CLI error)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        shown = repr(name[:80]) if isinstance(name, str) else type(name).__name__
        return (f"node name {shown} is not 1–64 characters of letters, digits, '.', '_' or '-' starting with a "
                "letter or digit")
    return None


@dataclass(frozen=True)
class MembershipPolicy:
    """``join_token``: what Join (and a download before Join) must present; required off loopback.
    ``read_token``: what GetRun and Status accept besides the join token (a run with neither is open to read).
    ``idle_rounds``: a member that neither contributed to nor observed this many rounds it was expected in is
    evicted (0: never), and one with no payload in as many rounds (or for ``idle_s`` seconds) makes room for a
    newcomer when the run is full."""

    min_nodes: int = 1
    max_nodes: int = 64
    heartbeat_s: float = 2.0
    lease_s: float = 10.0
    join_token: str = ""
    read_token: str = ""
    idle_rounds: int = 5
    idle_s: float = 600.0

    def __post_init__(self) -> None:
        if self.min_nodes < 1:
            raise ConfigError(f"membership.min_nodes must be ≥ 1, got {self.min_nodes}")
        if self.max_nodes < self.min_nodes:
            raise ConfigError(f"membership.max_nodes ({self.max_nodes}) must be ≥ min_nodes ({self.min_nodes})")
        if not 0 < self.heartbeat_s < self.lease_s:
            raise ConfigError(f"membership: need 0 < heartbeat_s ({self.heartbeat_s}) < lease_s ({self.lease_s})")
        if self.idle_rounds < 0 or self.idle_s <= 0:
            raise ConfigError(f"membership: need idle_rounds ≥ 0 ({self.idle_rounds}) and idle_s > 0 ({self.idle_s})")
        for key in ("join_token", "read_token"):
            token = getattr(self, key)
            if len(token) > 256 or not token.isprintable() or " " in token:
                raise ConfigError(f"membership.{key} must be at most 256 printable characters without spaces")


@dataclass(frozen=True)
class DeadlinePolicy:
    """Round deadline = first submission + clamp(margin × quantile(recent submission spreads)). A newcomer's first
    round may wait longer, at most ``newcomer_fraction`` × the run's round period (see ``newcomer_wait``)."""

    initial_wait_s: float = 30.0
    min_wait_s: float = 2.0
    max_wait_s: float = 300.0
    quantile: float = 0.9
    margin: float = 2.0
    history: int = 20
    newcomer_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.min_wait_s <= self.max_wait_s:
            raise ConfigError(f"rounds: need 0 < min_wait_s ({self.min_wait_s}) ≤ max_wait_s ({self.max_wait_s})")
        if not 0 < self.quantile <= 1:
            raise ConfigError(f"rounds.quantile must be in (0, 1], got {self.quantile}")
        if self.margin < 1:
            raise ConfigError(f"rounds.margin must be ≥ 1, got {self.margin}")
        if self.history < 1:
            raise ConfigError(f"rounds.history must be ≥ 1, got {self.history}")
        if not 0 <= self.newcomer_fraction <= 4:
            raise ConfigError(f"rounds.newcomer_fraction must be in [0, 4], got {self.newcomer_fraction}")


@dataclass
class Member:
    node_id: str
    name: str
    first_round: int  # the first round this member is expected to contribute to
    shard: int
    joined_at: float
    last_heartbeat: float
    capabilities: tuple[str, ...] = ()
    rounds_contributed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    last_loss: float = float("nan")
    public_key: bytes = b""  # the node's identity (node/identity.py)
    contributed_round: int = -1  # the last round it sent a payload for
    contributed_at: float = 0.0  # when (coordinator clock); the join time until its first payload
    active_round: int = -1  # the last round it contributed to or observed
    transfers: int = 0  # state or result downloads in progress (an honest joiner on a slow link is not idle)
    holds_state: bool = False  # it downloaded the run's state since it joined (or just before, with its key)

    def missed_rounds(self, open_round: int, observed: bool = True) -> int:
        """Closed rounds it was expected in since its last payload (``observed``: or observation)."""
        last = self.active_round if observed else self.contributed_round
        return max(0, open_round - max(self.first_round, last + 1))


@dataclass(frozen=True)
class Decision:
    act: bool
    reason: str


class CloseKind(str, enum.Enum):
    """Why a round closed, or why it stays open: the data behind ``CloseDecision.reason`` (which is for people)."""

    ALL_SUBMITTED = "all_submitted"  # every expected member's payload is in
    DEADLINE_QUORUM = "deadline_quorum"  # the deadline passed with at least min_nodes payloads
    NO_PAYLOAD = "no_payload"  # open: nobody submitted yet
    WAITING = "waiting"  # open: the deadline has not passed and members are missing
    NO_QUORUM = "no_quorum"  # open: the deadline passed with fewer than min_nodes payloads
    #: the deadline passed with fewer than min_nodes payloads, and every member still missing observes the round (it
    #: said it will not send one: a refused frame, a node catching up): no more can come, so it closes with them
    QUORUM_UNREACHABLE = "quorum_unreachable"


@dataclass(frozen=True)
class CloseDecision:
    close: bool
    kind: CloseKind
    reason: str
    members: tuple[str, ...] = field(default_factory=tuple)  # node ids whose payloads make the round


#: After a coordinator restart its members need time to find it again: their channels retry with a backoff of up to
#: 5 s (node/transport/grpc_client.py), then a heartbeat goes out. Restored leases allow at least this much silence.
RESTART_GRACE_S = 15.0


def restored_heartbeat(now: float, policy: MembershipPolicy) -> float:
    """The heartbeat time a restarted coordinator gives the members it restores: their lease then runs out no
    sooner than ``max(lease_s, RESTART_GRACE_S)`` from now (a restart must not expel members that are reconnecting)."""
    return now + max(0.0, RESTART_GRACE_S - policy.lease_s)


def expired_members(now: float, members: Mapping[str, Member], policy: MembershipPolicy) -> list[tuple[str, str]]:
    """Members whose lease ran out, with the reason."""
    out = []
    for node_id, m in members.items():
        silent = now - m.last_heartbeat
        if silent > policy.lease_s:
            out.append((node_id, f"{m.name}: no heartbeat for {silent:.1f} s (lease {policy.lease_s:.1f} s)"))
    return out


def expected_members(members: Mapping[str, Member], round_: int) -> set[str]:
    """Live members that owe a payload for ``round_`` (joiners start at their first round)."""
    return {nid for nid, m in members.items() if m.first_round <= round_}


def free_shard(members: Iterable[Member], num_shards: int) -> int | None:
    taken = {m.shard for m in members}
    return next((s for s in range(num_shards) if s not in taken), None)


class AdmitKind(str, enum.Enum):
    ADMITTED = "admitted"
    REPLACED = "replaced"  # the same name and key: the node restarted and takes its place back
    EVICTED = "evicted"  # admitted in the place of an idle member
    TAKEN = "taken"  # the name belongs to a live member with another key (or no key is known)
    FULL = "full"


@dataclass(frozen=True)
class Admission:
    act: bool
    reason: str
    kind: AdmitKind = AdmitKind.ADMITTED
    other: str | None = None  # REPLACED / EVICTED: the node id whose place it takes


def admit(members: Mapping[str, Member], name: str, policy: MembershipPolicy, public_key: bytes | None = None,
          now: float = 0.0, open_round: int = 0) -> Admission:
    """Whether a node may join. A live member of the same name and the same key is the node itself, restarted: it
    takes that place back at once, even in a full run. The same name with another key is refused (names are
    labels, keys are identities). A full run admits a newcomer in the place of the idlest member that has sent no
    payload in ``idle_rounds`` rounds it was expected in, or for ``idle_s`` seconds (see ``evictable``)."""
    same = next((m for m in members.values() if m.name == name), None)
    if same is not None and public_key is not None and same.public_key == public_key:
        return Admission(True, f"{name} restarted: it takes its place back", AdmitKind.REPLACED, same.node_id)
    if len(members) >= policy.max_nodes:
        idle = evictable(members, policy, now, open_round)
        if idle is None:
            return Admission(False, f"the run is full ({policy.max_nodes} members)", AdmitKind.FULL)
        if same is None:
            m = members[idle]
            return Admission(True, f"the run is full: {name} takes the place of idle member {m.name} (no payload "
                                   f"for {now - m.contributed_at:.0f} s, {m.missed_rounds(open_round, False)} rounds)",
                             AdmitKind.EVICTED, idle)
    if same is not None:
        other = f" with another key (key id {_kid(same.public_key)})" if public_key is not None else ""
        return Admission(False, f"a live member is already named {name!r}{other}; pick another --name or wait for "
                                "its lease to expire", AdmitKind.TAKEN)
    return Admission(True, "admitted")


def _kid(public: bytes) -> str:
    return key_id(public) if public else "none"


def evictable(members: Mapping[str, Member], policy: MembershipPolicy, now: float, open_round: int) -> str | None:
    """The member a newcomer may replace in a full run: one with no download in progress that sent no payload in
    ``idle_rounds`` rounds it was expected in or for ``idle_s`` seconds — the one idle longest; None if none is."""
    idle = [m for m in members.values() if m.transfers == 0 and (
        (policy.idle_rounds and m.missed_rounds(open_round, observed=False) >= policy.idle_rounds)
        or now - m.contributed_at > policy.idle_s)]
    return min(idle, key=lambda m: (m.contributed_at, m.node_id)).node_id if idle else None


def idle_members(open_round: int, members: Mapping[str, Member], policy: MembershipPolicy) -> list[tuple[str, str]]:
    """Members that neither contributed to nor observed any of the last ``idle_rounds`` closed rounds they were
    expected in, with no download in progress: they hold a place (and make rounds wait) without taking part."""
    if not policy.idle_rounds:
        return []
    return [(nid, f"{m.name}: no payload or observation in the last {m.missed_rounds(open_round)} rounds "
                  f"(idle_rounds {policy.idle_rounds})")
            for nid, m in members.items() if m.transfers == 0 and m.missed_rounds(open_round) >= policy.idle_rounds]


def run_started(open_round: int, joined: int, policy: MembershipPolicy) -> Decision:
    """The run starts once min_nodes members have joined: until then round 0 stays open for everyone, so the
    first node up does not commit rounds alone while the others are still starting."""
    if open_round == 0 and joined < policy.min_nodes:
        return Decision(False, f"waiting for {policy.min_nodes} member{'s' if policy.min_nodes != 1 else ''} to start "
                               f"the run ({joined} joined)")
    return Decision(True, "started")


def round_wait(spreads: Sequence[float], policy: DeadlinePolicy) -> tuple[float, str]:
    """How long after the first submission a round waits for the rest.

    ``spreads`` are recent rounds' (last − first submission) times; their quantile × margin, clamped,
    adapts the deadline to how the run actually behaves instead of a fixed constant.
    """
    if not spreads:
        return policy.initial_wait_s, f"no history: initial wait {policy.initial_wait_s:.1f} s"
    recent = sorted(spreads[-policy.history:])
    idx = min(len(recent) - 1, max(0, math.ceil(policy.quantile * len(recent)) - 1))
    raw = recent[idx] * policy.margin
    wait = min(policy.max_wait_s, max(policy.min_wait_s, raw))
    return wait, (f"q{policy.quantile:.2f} of {len(recent)} spreads = {recent[idx]:.2f} s × {policy.margin} "
                  f"→ {wait:.2f} s (bounds {policy.min_wait_s}–{policy.max_wait_s} s)")


def newcomer_wait(adaptive_s: float, round_period_s: float | None, eligible: Sequence[str],
                  policy: DeadlinePolicy) -> tuple[float, str]:
    """How long a round whose first payload just arrived waits when ``eligible`` newcomers contribute for the first
    time in it (they fetched the state and started their inner steps after the others): the adaptive wait,
    lengthened to at most ``newcomer_fraction`` × the run's round period (``initial_wait_s`` before one is known)
    and never beyond ``max_wait_s``. Eligibility — earned (the newcomer downloaded the state) and granted once per
    key — is the caller's; with none eligible, or a fraction of 0, the adaptive wait stands."""
    if not eligible or policy.newcomer_fraction <= 0:
        return adaptive_s, ""
    period = round_period_s if round_period_s and round_period_s > 0 else policy.initial_wait_s
    cap = policy.newcomer_fraction * period
    if cap <= adaptive_s:
        return adaptive_s, ""
    wait = min(policy.max_wait_s, cap)
    return wait, (f"first round of {', '.join(sorted(eligible))}: {policy.newcomer_fraction:g} × round period "
                  f"{period:.2f} s → {wait:.2f} s (max {policy.max_wait_s} s)")


def decide_close(now: float, expected: set[str], submitted: set[str], deadline: float | None,
                 policy: MembershipPolicy, observing: Iterable[str] = ()) -> CloseDecision:
    """Close when every expected member submitted, or at the deadline with at least min_nodes payloads — or, below
    min_nodes, at the deadline when every missing member is ``observing`` the round (it takes the result without a
    payload): waiting longer could not bring the quorum, so the run would wait forever."""
    got = tuple(sorted(submitted))
    if not submitted:
        return CloseDecision(False, CloseKind.NO_PAYLOAD, "no payload yet")
    missing = expected - submitted
    if not missing:
        return CloseDecision(True, CloseKind.ALL_SUBMITTED, f"all {len(expected)} live members submitted", got)
    if deadline is not None and now >= deadline:
        if len(submitted) >= policy.min_nodes:
            return CloseDecision(True, CloseKind.DEADLINE_QUORUM,
                                 f"deadline passed with {len(submitted)}/{len(expected)} payloads "
                                 f"(≥ min_nodes {policy.min_nodes}); missing {len(missing)}", got)
        if missing <= set(observing):
            return CloseDecision(True, CloseKind.QUORUM_UNREACHABLE,
                                 f"deadline passed with {len(submitted)} < min_nodes {policy.min_nodes} payloads, and "
                                 f"the {len(missing)} missing member(s) observe this round: no more payloads can come, "
                                 f"closing with {len(submitted)}", got)
        return CloseDecision(False, CloseKind.NO_QUORUM, f"deadline passed but only {len(submitted)} < min_nodes "
                                                         f"{policy.min_nodes} payloads: waiting for quorum")
    return CloseDecision(False, CloseKind.WAITING, f"waiting for {len(missing)} of {len(expected)} members")
