"""The coordinator's membership policies added for trust (node/membership.py), as pure functions on plain numbers:
who may join (restart, name owned by another key, a full run with an idle member), who is idle, how much longer a
newcomer's first round may wait, and what a node name may be."""
from __future__ import annotations

import pytest

from node.membership import (AdmitKind, DeadlinePolicy, Member, MembershipPolicy, admit, check_node_name, evictable,
                             idle_members, newcomer_wait)

POLICY = MembershipPolicy(min_nodes=1, max_nodes=2, heartbeat_s=1.0, lease_s=5.0, idle_rounds=3, idle_s=100.0)


def member(node_id: str, name: str, key: bytes, *, first: int = 0, contributed: int = -1, active: int | None = None,
           at: float = 0.0, transfers: int = 0) -> Member:
    return Member(node_id, name, first, 0, 0.0, 0.0, public_key=key, contributed_round=contributed,
                  active_round=contributed if active is None else active, contributed_at=at, transfers=transfers)


def test_the_same_key_takes_its_place_back_even_in_a_full_run_and_another_key_cannot() -> None:
    ms = {"1": member("1", "a", b"A" * 32), "2": member("2", "b", b"B" * 32)}
    d = admit(ms, "a", POLICY, b"A" * 32, now=1.0, open_round=0)
    assert d.act and d.kind is AdmitKind.REPLACED and d.other == "1" and d.reason == "a restarted: it takes its place back"
    d = admit(ms, "a", POLICY, b"M" * 32, now=1.0, open_round=0)
    assert not d.act and d.kind is AdmitKind.FULL  # full, and nobody idle
    d = admit({"1": ms["1"]}, "a", POLICY, b"M" * 32, now=1.0, open_round=0)
    assert not d.act and d.kind is AdmitKind.TAKEN and "already named 'a' with another key (key id " in d.reason


def test_a_full_run_admits_a_newcomer_in_the_place_of_the_idlest_member() -> None:
    ms = {"1": member("1", "a", b"A" * 32, contributed=9, at=90.0),
          "2": member("2", "b", b"B" * 32, contributed=7, active=9, at=50.0)}  # b observes, sends nothing
    assert admit(ms, "c", POLICY, b"C" * 32, now=100.0, open_round=10).kind is AdmitKind.FULL  # 2 rounds, 50 s
    assert evictable(ms, POLICY, 100.0, 10) is None
    assert evictable(ms, POLICY, 151.0, 10) == "2"  # no payload for 101 s > idle_s
    ms["2"].transfers = 1  # downloading (an honest joiner on a slow link): not idle
    assert evictable(ms, POLICY, 151.0, 10) is None
    ms["2"].transfers, ms["2"].contributed_round = 0, 6
    d = admit(ms, "c", POLICY, b"C" * 32, now=100.0, open_round=10)
    assert d.act and d.kind is AdmitKind.EVICTED and d.other == "2"
    assert d.reason == "the run is full: c takes the place of idle member b (no payload for 50 s, 3 rounds)"


def test_the_first_admission_check_fails_closed_before_any_key_is_known() -> None:
    ms = {"1": member("1", "a", b"A" * 32)}
    d = admit(ms, "a", POLICY)  # no key: a name conflict, as before protocol 2
    assert not d.act and "wait for its lease to expire" in d.reason


def test_idle_members_neither_contributed_nor_observed_idle_rounds_rounds() -> None:
    ms = {"1": member("1", "a", b"A" * 32, contributed=9), "2": member("2", "b", b"B" * 32, contributed=6),
          "3": member("3", "c", b"C" * 32, contributed=2, active=8), "4": member("4", "d", b"D" * 32, first=8),
          "5": member("5", "e", b"E" * 32, contributed=1, transfers=1)}
    out = dict(idle_members(10, ms, POLICY))
    assert set(out) == {"2"} and out["2"] == "b: no payload or observation in the last 3 rounds (idle_rounds 3)"
    assert idle_members(10, ms, MembershipPolicy(idle_rounds=0)) == []


def test_a_newcomers_longer_wait_is_bounded_by_a_fraction_of_the_round_period() -> None:
    p = DeadlinePolicy(initial_wait_s=30.0, min_wait_s=1.0, max_wait_s=60.0, newcomer_fraction=0.5)
    assert newcomer_wait(2.0, 20.0, [], p) == (2.0, "")
    wait, why = newcomer_wait(2.0, 20.0, ["c", "b"], p)
    assert wait == 10.0 and why == "first round of b, c: 0.5 × round period 20.00 s → 10.00 s (max 60.0 s)"
    assert newcomer_wait(2.0, None, ["c"], p)[0] == 15.0  # no period yet: the initial wait's fraction
    assert newcomer_wait(12.0, 20.0, ["c"], p) == (12.0, "")  # never shorter than the adaptive wait
    assert newcomer_wait(2.0, 1000.0, ["c"], p)[0] == 60.0  # never longer than max_wait_s
    assert newcomer_wait(2.0, 20.0, ["c"], DeadlinePolicy(newcomer_fraction=0.0)) == (2.0, "")


@pytest.mark.parametrize("name, ok", [("n1", True), ("paris-gpu0.host_1", True), ("a" * 64, True), ("", False),
                                      ("a" * 65, False), ("-lead", False), ("n1\nforged", False),
                                      ("\x1b[31mred", False), ("sp ace", False), ("ünï", False)])
def test_node_names_are_a_safe_charset_and_length(name: str, ok: bool) -> None:
    assert (check_node_name(name) is None) == ok
