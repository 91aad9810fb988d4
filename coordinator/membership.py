"""Membership and round-closing decisions as pure functions of (now, state, policy).

Nothing here reads a clock or mutates state: each function returns a decision and a human-readable
reason, which the caller logs. Tests drive them with a fake clock.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from coordinator.config import DeadlinePolicy, MembershipPolicy


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


@dataclass(frozen=True)
class CloseDecision:
    close: bool
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
                 policy: MembershipPolicy) -> CloseDecision:
    """Close when every expected member submitted, or at the deadline with at least min_nodes payloads."""
    got = tuple(sorted(submitted))
    if not submitted:
        return CloseDecision(False, "no payload yet")
    missing = expected - submitted
    if not missing:
        return CloseDecision(True, f"all {len(expected)} live members submitted", got)
    if deadline is not None and now >= deadline:
        if len(submitted) >= policy.min_nodes:
            return CloseDecision(True, f"deadline passed with {len(submitted)}/{len(expected)} payloads "
                                       f"(≥ min_nodes {policy.min_nodes}); missing {len(missing)}", got)
        return CloseDecision(False, f"deadline passed but only {len(submitted)} < min_nodes {policy.min_nodes} "
                                    "payloads: waiting for quorum")
    return CloseDecision(False, f"waiting for {len(missing)} of {len(expected)} members")
