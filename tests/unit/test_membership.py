"""Membership and round-closing decisions: pure functions of (now, state, policy), driven by a fake clock
(plain floats). Every test checks the decision and the reason the coordinator would log."""
from __future__ import annotations

import pytest

from node.membership import (RESTART_GRACE_S, CloseDecision, CloseKind, DeadlinePolicy, Member, MembershipPolicy, admit,
                             decide_close,
                             expected_members, expired_members, free_shard, restored_heartbeat, round_wait,
                             run_started)

LEASE = MembershipPolicy(min_nodes=2, max_nodes=3, heartbeat_s=2.0, lease_s=10.0)


def member(node_id: str, name: str | None = None, *, first_round: int = 0, shard: int = 0,
           heartbeat: float = 100.0) -> Member:
    return Member(node_id=node_id, name=name or f"node-{node_id}", first_round=first_round, shard=shard,
                  joined_at=heartbeat, last_heartbeat=heartbeat)


def roster(*members: Member) -> dict[str, Member]:
    return {m.node_id: m for m in members}


# -- leases ------------------------------------------------------------------------------------------
def test_lease_boundary_silent_exactly_lease_is_not_expired() -> None:
    ms = roster(member("a", "alice", heartbeat=100.0))
    assert expired_members(110.0, ms, LEASE) == []
    assert expired_members(100.0, ms, LEASE) == []


def test_lease_expired_just_after_boundary_with_reason_naming_member() -> None:
    ms = roster(member("a", "alice", heartbeat=100.0), member("b", "bob", heartbeat=105.0))
    out = expired_members(110.5, ms, LEASE)
    assert [nid for nid, _ in out] == ["a"]
    reason = out[0][1]
    assert reason.startswith("alice: ")
    assert "no heartbeat for 10.5 s" in reason
    assert "(lease 10.0 s)" in reason


def test_lease_expiry_reports_every_silent_member() -> None:
    ms = roster(member("a", "alice", heartbeat=0.0), member("b", "bob", heartbeat=1.0),
                member("c", "carol", heartbeat=50.0))
    out = dict(expired_members(30.0, ms, LEASE))
    assert set(out) == {"a", "b"}
    assert "alice" in out["a"] and "30.0 s" in out["a"]
    assert "bob" in out["b"] and "29.0 s" in out["b"]


def test_no_members_nothing_expires() -> None:
    assert expired_members(1e9, {}, LEASE) == []


# -- expected members --------------------------------------------------------------------------------
def test_expected_members_excludes_joiners_for_later_rounds() -> None:
    ms = roster(member("a", first_round=0), member("b", first_round=3), member("c", first_round=4))
    assert expected_members(ms, 3) == {"a", "b"}
    assert expected_members(ms, 2) == {"a"}
    assert expected_members(ms, 4) == {"a", "b", "c"}
    assert expected_members({}, 0) == set()


# -- shards ------------------------------------------------------------------------------------------
def test_free_shard_is_the_smallest_untaken_slot() -> None:
    assert free_shard([], 4) == 0
    assert free_shard([member("a", shard=0), member("b", shard=2)], 4) == 1
    assert free_shard([member("a", shard=1), member("b", shard=2)], 4) == 0
    assert free_shard([member(str(i), shard=i) for i in range(4)], 4) is None


# -- admission ---------------------------------------------------------------------------------------
def test_admit_accepts_a_new_name() -> None:
    d = admit(roster(member("a", "alice")), "bob", LEASE)
    assert d.act and d.reason == "admitted"


def test_admit_refuses_duplicate_live_name() -> None:
    d = admit(roster(member("a", "alice")), "alice", LEASE)
    assert not d.act
    assert "already named 'alice'" in d.reason
    assert "wait for its lease to expire" in d.reason


def test_admit_refuses_when_full_even_for_a_new_name() -> None:
    ms = roster(member("a", "alice"), member("b", "bob"), member("c", "carol"))
    d = admit(ms, "dave", LEASE)
    assert not d.act
    assert d.reason == "the run is full (3 members)"


def test_admit_full_takes_precedence_over_duplicate() -> None:
    ms = roster(member("a", "alice"), member("b", "bob"), member("c", "carol"))
    d = admit(ms, "alice", LEASE)
    assert not d.act and "full" in d.reason


# -- round wait (adaptive deadline) ------------------------------------------------------------------
def test_round_wait_without_history_is_the_initial_wait() -> None:
    pol = DeadlinePolicy(initial_wait_s=30.0)
    wait, reason = round_wait([], pol)
    assert wait == 30.0
    assert reason == "no history: initial wait 30.0 s"


def test_round_wait_quantile_times_margin() -> None:
    pol = DeadlinePolicy(min_wait_s=1.0, max_wait_s=300.0, quantile=0.9, margin=2.0)
    # ceil(0.9 · 10) − 1 = index 8 of the sorted spreads → 9 s; × 2 → 18 s
    wait, reason = round_wait([10.0, 1.0, 9.0, 2.0, 8.0, 3.0, 7.0, 4.0, 6.0, 5.0], pol)
    assert wait == pytest.approx(18.0)
    assert "q0.90 of 10 spreads = 9.00 s × 2.0 → 18.00 s" in reason
    assert "(bounds 1.0–300.0 s)" in reason


def test_round_wait_median_and_full_quantile() -> None:
    spreads = [4.0, 1.0, 3.0, 2.0]
    # quantile 0.5: ceil(2) − 1 = index 1 → 2 s × 1.5
    wait, _ = round_wait(spreads, DeadlinePolicy(min_wait_s=0.5, quantile=0.5, margin=1.5))
    assert wait == pytest.approx(3.0)
    # quantile 1: the largest spread
    wait, reason = round_wait(spreads, DeadlinePolicy(min_wait_s=0.5, quantile=1.0, margin=1.0))
    assert wait == pytest.approx(4.0)
    assert "q1.00 of 4 spreads = 4.00 s" in reason
    # a tiny quantile still picks a real element (index 0), never index −1
    wait, _ = round_wait(spreads, DeadlinePolicy(min_wait_s=0.5, quantile=0.01, margin=1.0))
    assert wait == pytest.approx(1.0)


def test_round_wait_clamped_to_min_and_max() -> None:
    pol = DeadlinePolicy(min_wait_s=2.0, max_wait_s=120.0, quantile=0.9, margin=2.0)
    low, low_reason = round_wait([0.1, 0.2], pol)
    assert low == 2.0
    assert "→ 2.00 s (bounds 2.0–120.0 s)" in low_reason
    high, high_reason = round_wait([500.0], pol)
    assert high == 120.0
    assert "500.00 s × 2.0 → 120.00 s" in high_reason


def test_round_wait_uses_only_the_history_window() -> None:
    pol = DeadlinePolicy(min_wait_s=0.5, max_wait_s=1000.0, quantile=1.0, margin=1.0, history=3)
    # the three old 100 s spreads fall out of the window: only [1, 2, 3] count
    wait, reason = round_wait([100.0, 100.0, 100.0, 1.0, 2.0, 3.0], pol)
    assert wait == pytest.approx(3.0)
    assert "of 3 spreads" in reason
    # a recent slow round does count
    wait, _ = round_wait([1.0, 1.0, 1.0, 1.0, 50.0], pol)
    assert wait == pytest.approx(50.0)


# -- closing a round ---------------------------------------------------------------------------------
def test_close_no_payload_waits() -> None:
    d = decide_close(1000.0, {"a", "b"}, set(), 10.0, LEASE)
    assert d == CloseDecision(False, CloseKind.NO_PAYLOAD, "no payload yet")


def test_close_when_all_submitted_with_sorted_members() -> None:
    d = decide_close(0.0, {"c", "a", "b"}, {"b", "c", "a"}, None, LEASE)
    assert d.close
    assert d.members == ("a", "b", "c")
    assert d.kind is CloseKind.ALL_SUBMITTED and d.reason == "all 3 live members submitted"


def test_close_all_submitted_ignores_min_nodes() -> None:
    d = decide_close(0.0, {"a"}, {"a"}, 100.0, LEASE)  # min_nodes 2, but the only live member submitted
    assert d.close and d.members == ("a",)


def test_close_missing_before_deadline_waits() -> None:
    d = decide_close(104.9, {"a", "b", "c"}, {"a", "b"}, 105.0, LEASE)
    assert not d.close
    assert d.kind is CloseKind.WAITING and d.reason == "waiting for 1 of 3 members"
    assert d.members == ()


def test_close_missing_without_deadline_waits() -> None:
    d = decide_close(1e9, {"a", "b"}, {"a"}, None, LEASE)
    assert not d.close and d.reason == "waiting for 1 of 2 members"


def test_close_at_deadline_with_quorum_names_missing_count() -> None:
    d = decide_close(105.0, {"a", "b", "c", "d"}, {"b", "a"}, 105.0, MembershipPolicy(min_nodes=2))
    assert d.close
    assert d.members == ("a", "b")
    assert d.kind is CloseKind.DEADLINE_QUORUM and d.reason == "deadline passed with 2/4 payloads (≥ min_nodes 2); missing 2"


def test_close_deadline_passed_below_quorum_waits() -> None:
    d = decide_close(200.0, {"a", "b", "c"}, {"a"}, 105.0, LEASE)
    assert not d.close
    assert d.kind is CloseKind.NO_QUORUM and d.reason == "deadline passed but only 1 < min_nodes 2 payloads: waiting for quorum"


def test_close_counts_payloads_of_departed_members() -> None:
    # "a" left after submitting: it is no longer expected, but its payload still counts
    d = decide_close(0.0, {"b"}, {"a", "b"}, None, LEASE)
    assert d.close and d.members == ("a", "b")


def test_run_starts_once_min_nodes_joined() -> None:
    mp = MembershipPolicy(min_nodes=3)
    waiting = run_started(0, 2, mp)
    assert not waiting.act and waiting.reason == "waiting for 3 members to start the run (2 joined)"
    assert run_started(0, 3, mp).act
    assert run_started(5, 1, mp).act  # once under way, departures do not stop the run


def test_a_round_below_quorum_closes_when_no_more_payloads_can_come() -> None:
    """min_nodes 3, three members, one of which observes (its frame was refused): at the deadline the round closes
    with the two payloads it can get instead of waiting for a quorum forever (CloseKind.QUORUM_UNREACHABLE)."""
    policy = MembershipPolicy(min_nodes=3, max_nodes=3)
    expected, submitted = {"a", "b", "c"}, {"a", "c"}
    waiting = decide_close(10.0, expected, submitted, 5.0, policy)
    assert not waiting.close and waiting.kind is CloseKind.NO_QUORUM  # b may still send
    closed = decide_close(10.0, expected, submitted, 5.0, policy, observing={"b"})
    assert closed.close and closed.kind is CloseKind.QUORUM_UNREACHABLE and closed.members == ("a", "c")
    assert "2 < min_nodes 3" in closed.reason and "observe" in closed.reason
    early = decide_close(4.0, expected, submitted, 5.0, policy, observing={"b"})
    assert not early.close and early.kind is CloseKind.WAITING  # the deadline still applies


def test_a_restarted_coordinator_gives_restored_members_at_least_the_grace_to_reconnect() -> None:
    short = MembershipPolicy(min_nodes=1, max_nodes=3, heartbeat_s=0.5, lease_s=3.0)
    long = MembershipPolicy(min_nodes=1, max_nodes=3, heartbeat_s=2.0, lease_s=30.0)
    assert restored_heartbeat(100.0, short) == 100.0 + RESTART_GRACE_S - 3.0  # silence allowed: the grace
    assert restored_heartbeat(100.0, long) == 100.0  # the lease is longer than the grace already
    m = Member("n", "a", 0, 0, 0.0, restored_heartbeat(100.0, short))
    assert expired_members(100.0 + RESTART_GRACE_S - 0.1, {"n": m}, short) == []
    assert [nid for nid, _ in expired_members(100.0 + RESTART_GRACE_S + 0.1, {"n": m}, short)] == ["n"]
