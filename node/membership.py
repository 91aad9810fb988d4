"""Membership and round-closing decisions as pure functions of (now, state, policy).

Nothing here reads a clock or mutates state: each function returns a decision and a human-readable
reason, which the caller logs. Tests drive them with a fake clock.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from node.errors import ConfigError


@dataclass(frozen=True)
class MembershipPolicy:
    min_nodes: int = 1
    max_nodes: int = 64
    heartbeat_s: float = 2.0
    lease_s: float = 10.0
    join_token: str = ""

    def __post_init__(self) -> None:
        if self.min_nodes < 1:
            raise ConfigError(f"membership.min_nodes must be ≥ 1, got {self.min_nodes}")
        if self.max_nodes < self.min_nodes:
            raise ConfigError(f"membership.max_nodes ({self.max_nodes}) must be ≥ min_nodes ({self.min_nodes})")
        if not 0 < self.heartbeat_s < self.lease_s:
            raise ConfigError(f"membership: need 0 < heartbeat_s ({self.heartbeat_s}) < lease_s ({self.lease_s})")


@dataclass(frozen=True)
class DeadlinePolicy:
    """Round deadline = first submission + clamp(margin × quantile(recent submission spreads))."""

    initial_wait_s: float = 30.0
    min_wait_s: float = 2.0
    max_wait_s: float = 300.0
    quantile: float = 0.9
    margin: float = 2.0
    history: int = 20

    def __post_init__(self) -> None:
        if not 0 < self.min_wait_s <= self.max_wait_s:
            raise ConfigError(f"rounds: need 0 < min_wait_s ({self.min_wait_s}) ≤ max_wait_s ({self.max_wait_s})")
        if not 0 < self.quantile <= 1:
            raise ConfigError(f"rounds.quantile must be in (0, 1], got {self.quantile}")
        if self.margin < 1:
            raise ConfigError(f"rounds.margin must be ≥ 1, got {self.margin}")
        if self.history < 1:
            raise ConfigError(f"rounds.history must be ≥ 1, got {self.history}")


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


def admit(members: Mapping[str, Member], name: str, policy: MembershipPolicy) -> Decision:
    if len(members) >= policy.max_nodes:
        return Decision(False, f"the run is full ({policy.max_nodes} members)")
    if any(m.name == name for m in members.values()):
        return Decision(False, f"a live member is already named {name!r}; pick another --name or wait for its lease to expire")
    return Decision(True, "admitted")


def run_started(open_round: int, joined: int, policy: MembershipPolicy) -> Decision:
    """The run starts once min_nodes members have joined: until then round 0 stays open for everyone, so the
    first node up does not commit rounds alone while the others are still starting."""
    if open_round == 0 and joined < policy.min_nodes:
        return Decision(False, f"waiting for {policy.min_nodes} members to start the run ({joined} joined)")
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
