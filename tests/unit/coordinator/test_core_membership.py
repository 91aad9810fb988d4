"""CoordinatorCore with a fake clock: joins and their refusals, deadlines, leases and leaving. Harness:
core_harness.py; fixtures ``clock``, ``make``, ``h``: conftest.py."""
from __future__ import annotations

import json
import re
from typing import Any, Callable

import pytest

from core_harness import T0, Clock, Harness
from node.identity import NodeKey, key_id
from coordinator.errors import (Conflict, Full, Invalid, Refused, StillOpen, Truncated, Unauthorized, UnknownNode,
                                WrongRound)
from node.config import run_config_from_dict


# -- joining -----------------------------------------------------------------------------------------
def test_join_assigns_ids_shards_and_first_round(h: Harness) -> None:
    a = h.join("a")
    b = h.join("b")
    assert re.fullmatch(r"[0-9a-f]{32}", a["node_id"]) and a["node_id"] != b["node_id"]
    assert (a["shard"], b["shard"]) == (0, 1)
    assert a["num_shards"] == 4
    assert a["first_round"] == b["first_round"] == 0
    assert a["current_round"] == 0 and a["committed_rounds"] == 0
    assert a["lease_ms"] == 10_000 and a["heartbeat_interval_ms"] == 2000
    assert run_config_from_dict(json.loads(a["config_json"])) == h.cfg.run
    # Once a payload of round 0 is in, a joiner starts with the next round.
    h.submit("a", 0)
    c = h.join("c")
    assert c["first_round"] == 1 and c["current_round"] == 0 and c["shard"] == 2
    # Shards are reused: the smallest free slot.
    h.core.leave(b["node_id"], "test")
    assert h.join("d")["shard"] == 1
    assert h.core.members[a["node_id"]].capabilities == ("device=cpu",)


def test_join_same_name_with_another_key_is_a_conflict(h: Harness) -> None:
    h.join("a")
    with pytest.raises(Conflict, match=f"the name 'a' is bound to key {key_id(h.key('a').public)}") as info:
        h.join("a", key=NodeKey.generate())
    assert info.value.code == "ALREADY_EXISTS"
    # a name that happens to contain "full" is still a conflict, not a full run
    h.join("carefully")
    with pytest.raises(Conflict, match="the name 'carefully' is bound to key"):
        h.join("carefully", key=NodeKey.generate())


def test_the_same_node_restarted_takes_its_place_back_at_once(h: Harness, clock: Clock) -> None:
    """kill -9 and restart with the same workdir (same key): no wait for the old lease, the old session ends, the
    shard stays; the payload the old session already sent still counts in its round."""
    a1, b = h.join("a"), h.join("b")
    h.submit("a", 0)
    clock.advance(1.0)  # far inside the 10 s lease of the dead session
    a2 = h.join("a")
    assert a2["replaced"] and a2["node_id"] != a1["node_id"] and a2["shard"] == a1["shard"]
    assert a2["first_round"] == 1  # round 0 already holds its payload
    with pytest.raises(UnknownNode):
        h.core.heartbeat(a1["node_id"])
    assert sorted(m.name for m in h.core.members.values()) == ["a", "b"]
    h.submit("b", 0)
    assert h.core.open_round == 1 and h.store.recent_rounds()[-1].members == ["a", "b"]
    assert h.join("b", key=h.key("b"))["replaced"] and b["node_id"] not in h.core.members


def test_join_when_full(make: Callable[..., Harness]) -> None:
    h = make({"membership": {"max_nodes": 2}})
    h.join("a")
    h.join("b")
    with pytest.raises(Full, match=re.escape("the run is full (2 members)")):
        h.join("c")


def test_join_with_different_config_is_refused_naming_the_field(h: Harness) -> None:
    theirs = json.loads(h.info["config_json"])
    theirs["recipe"]["H"] = 2
    with pytest.raises(Refused) as info:
        h.join("a", config_json=json.dumps(theirs))
    assert "this node differs from the run (node vs run)" in str(info.value)
    assert "config recipe.H: 2 vs 1" in str(info.value)
    theirs["recipe"]["inner"]["lr"] = 1.0
    with pytest.raises(Refused, match=r"recipe\.H: 2 vs 1; config recipe\.inner\.lr: 1\.0 vs 0\.0005"):
        h.join("a", config_json=json.dumps(theirs))
    assert h.core.members == {}


@pytest.mark.parametrize("kw, error, pattern, code", [
    ({"protocol_version": 1}, Refused, "protocol version 1 is not supported; this coordinator speaks 3",
     "FAILED_PRECONDITION"),
    ({"task_fingerprint": "0" * 64}, Refused, "task fingerprint 0000000000000000 vs ", "FAILED_PRECONDITION"),
    ({"digest": "deadbeefdeadbeef"}, Refused, "model digest deadbeefdeadbeef vs ", "FAILED_PRECONDITION"),
    ({"config_json": "", "config_hash": "feedfeedfeedfeed"}, Refused, "config hash feedfeedfeedfeed vs ",
     "FAILED_PRECONDITION"),
    ({"config_json": "{not json"}, Invalid, "config_json: not valid JSON", "INVALID_ARGUMENT"),
    ({"config_json": "[1, 2]"}, Invalid, "config_json: must be a JSON object", "INVALID_ARGUMENT"),
])
def test_join_refusals(h: Harness, kw: dict[str, Any], error: type, pattern: str, code: str) -> None:
    with pytest.raises(error, match=re.escape(pattern)) as info:
        h.join(kw.pop("name", "a"), **kw)
    assert info.value.code == code
    assert h.core.members == {}


def test_join_names_every_difference_at_once(h: Harness) -> None:
    theirs = json.loads(h.info["config_json"])
    theirs["recipe"]["H"] = 2
    with pytest.raises(Refused) as info:
        h.join("a", config_json=json.dumps(theirs), config_hash="feedfeedfeedfeed", task_fingerprint="0" * 64,
               digest="deadbeefdeadbeef")
    message = str(info.value)
    for part in ("config recipe.H: 2 vs 1", "config hash feedfeedfeedfeed vs", "task fingerprint 0000000000000000 vs",
                 "model digest deadbeefdeadbeef vs"):
        assert part in message
    assert h.core.members == {}


def test_get_run_checks_the_protocol_version(h: Harness) -> None:
    for version in (0, 2, 4):
        with pytest.raises(Refused, match=f"protocol version {version} is not supported") as info:
            h.core.run_info(version, h.cfg.membership.join_token)
        assert info.value.code == "FAILED_PRECONDITION"


def test_a_member_idle_for_idle_rounds_is_evicted_and_a_full_run_makes_room(make: Callable[..., Harness],
                                                                             clock: Clock) -> None:
    """Squatting: members that never take part hold places and make every round wait for its deadline. One that
    neither contributed nor observed ``idle_rounds`` rounds is evicted by tick(); in a full run a newcomer takes the
    place of one that sent no payload for ``idle_rounds`` rounds (observing does not count there)."""
    h = make({"membership": {"max_nodes": 3, "idle_rounds": 2}})
    for n in "abc":
        h.join(n)
    for r in range(2):  # c sits out; the rounds close at their deadline with a and b
        h.submit("a", r), h.submit("b", r)
        clock.advance(6.0)
        for n in "abc":
            h.core.heartbeat(h.ids[n])
        h.core.tick()
    assert h.core.open_round == 2 and sorted(m.name for m in h.core.members.values()) == ["a", "b"]
    h.join("d")
    with pytest.raises(Full, match=re.escape("the run is full (3 members)")):
        h.join("e")
    for r in (2, 3):  # d only observes; c and d sent no payload
        h.submit("a", r), h.submit("b", r)
        h.core.collect(h.ids["d"], r, 0.0, False)
        clock.advance(6.0)
        for n in "abd":
            h.core.heartbeat(h.ids[n])
        h.core.tick()
    assert {m.name for m in h.core.members.values()} == {"a", "b", "d"}  # d observed, so tick() keeps it
    h.join("f")  # full again (a, b, d); d has sent no payload for 2 rounds: f takes its place
    assert {m.name for m in h.core.members.values()} == {"a", "b", "f"}


def test_join_token(make: Callable[..., Harness]) -> None:
    h = make({"membership": {"join_token": "s3cret"}})
    with pytest.raises(Unauthorized, match="join token missing or wrong for this run") as info:
        h.join("a")
    assert info.value.code == "UNAUTHENTICATED"
    with pytest.raises(Unauthorized):
        h.join("a", join_token="s3cret-not")
    assert h.join("a", join_token="s3cret")["first_round"] == 0


def test_a_node_that_has_not_joined_downloads_the_state_with_the_join_token(make: Callable[..., Harness]) -> None:
    # the download of a joiner-to-be runs while its process starts up (node/transport/state_prefetch.py)
    h = make({"membership": {"join_token": "s3cret"}})
    for token in ("", "s3cret-not"):
        with pytest.raises(Unauthorized, match="join token missing or wrong for this run"):
            list(h.core.fetch_state("", 0, token))
    h.join("a", join_token="s3cret"), h.join("b", join_token="s3cret")
    h.submit("a", 0), h.submit("b", 0)
    blob = b"".join(p["data"] for p in h.core.fetch_state("", 0, "s3cret"))
    assert blob == b"".join(p["data"] for p in h.core.fetch_state(h.ids["a"], 0))
    assert h.core.members[h.ids["a"]].bytes_out == len(blob)  # a non-member's download is nobody's traffic


# -- deadlines and leases ----------------------------------------------------------------------------
def test_deadline_commits_with_the_payloads_that_arrived(h: Harness, clock: Clock) -> None:
    for n in "abc":
        h.join(n)
    h.submit("a", 0)
    assert h.core.deadline == T0 + 5.0  # no history: initial_wait_s
    assert h.core.deadline_reason == "no history: initial wait 5.0 s"
    clock.advance(1.0)
    h.submit("b", 0)
    assert h.core.deadline == T0 + 5.0  # set by the first payload only
    clock.advance(3.9)
    h.core.tick()
    assert h.core.open_round == 0
    assert h.core.status()["deadline_in_s"] == pytest.approx(0.1)
    clock.advance(0.1)
    h.core.tick()
    assert h.core.open_round == 1
    row = h.store.recent_rounds()[-1]
    assert row.members == ["a", "b"]
    assert row.reason == "deadline passed with 2/3 payloads (≥ min_nodes 2); missing 1"
    assert row.duration_s == pytest.approx(5.0)
    assert list(h.core.spreads) == []  # a round cut by its deadline says nothing about the spread
    assert h.core.deadline is None and h.core.status()["deadline_in_s"] == -1.0
    result, to_send = h.core.collect(h.ids["c"], 0, 0.0, False)  # the straggler collects the others
    assert to_send == ["a", "b"] and result.reason == row.reason


def test_deadline_below_quorum_waits_for_quorum(h: Harness, clock: Clock) -> None:
    for n in "abc":
        h.join(n)
    h.submit("a", 0)
    clock.advance(6.0)
    h.core.tick()
    assert h.core.open_round == 0
    with pytest.raises(StillOpen, match="deadline passed but only 1 < min_nodes 2 payloads: waiting for quorum"):
        h.core.collect(h.ids["a"], 0, 0.0, True)
    h.submit("b", 0)  # quorum reached after the deadline: closes at once
    assert h.core.open_round == 1
    assert h.store.recent_rounds()[-1].reason == "deadline passed with 2/3 payloads (≥ min_nodes 2); missing 1"


def test_deadline_adapts_to_the_observed_spread(h: Harness, clock: Clock) -> None:
    for n in "ab":
        h.join(n)
    h.submit("a", 0)
    clock.advance(3.0)
    h.submit("b", 0)  # spread 3 s
    assert list(h.core.spreads) == [3.0]
    clock.advance(10.0)
    h.submit("a", 1)
    # quantile 1.0 × margin 2 of [3 s] = 6 s
    assert h.core.deadline == pytest.approx(clock.t + 6.0)
    assert h.core.deadline_reason == "q1.00 of 1 spreads = 3.00 s × 2.0 → 6.00 s (bounds 1.0–60.0 s)"


def test_a_late_payload_teaches_the_deadline_to_wait_for_the_straggler(h: Harness, clock: Clock) -> None:
    for n in "abc":
        h.join(n)
    h.submit("a", 0)
    clock.advance(1.0)
    h.submit("b", 0)
    clock.advance(4.0)
    h.core.tick()  # the 5 s initial wait passed: round 0 closes without c
    assert h.core.open_round == 1 and list(h.core.spreads) == []
    clock.advance(2.0)
    for _ in range(2):  # c arrives 7 s after the round's first payload (and retries): noted once
        with pytest.raises(WrongRound, match="round 0 is closed"):
            h.submit("c", 0)
    assert list(h.core.spreads) == [7.0]
    h.submit("a", 1)
    assert h.core.deadline == pytest.approx(clock.t + 14.0)  # quantile 1.0 × margin 2 × 7 s


def later(h: Harness, clock: Clock, dt: float) -> None:
    """``dt`` seconds pass; every member heartbeats; the coordinator ticks."""
    clock.advance(dt)
    for nid in list(h.core.members):
        h.core.heartbeat(nid)
    h.core.tick()


def test_a_newcomers_first_round_waits_longer_only_once_it_earned_it_and_at_most_a_fraction_of_a_round(
        h: Harness, clock: Clock) -> None:
    """A joiner fetches the state and starts its inner steps after the others: the deadline learnt from members
    in step would close its first round without it. That round waits longer — at most ``newcomer_fraction`` (0.5)
    × the run's round period — but only for a newcomer that downloaded the state, and once per key: a stream of
    fresh Joins that never submit cannot stall the run."""
    for n in "ab":
        h.join(n)
    for r in range(3):  # a round every 20 s, each with a 1 s spread: the adaptive wait is 2 s
        h.submit("a", r)
        later(h, clock, 1.0)
        h.submit("b", r)
        later(h, clock, 19.0)
    h.submit("a", 3)
    assert h.join("lazy")["first_round"] == 4
    later(h, clock, 1.0)
    h.submit("b", 3)
    later(h, clock, 19.0)
    h.submit("a", 4)
    assert h.core.deadline == pytest.approx(clock.t + 2.0)  # lazy never fetched the state: nothing earned
    assert h.core.deadline_reason.startswith("q1.00 of")
    later(h, clock, 1.0)
    h.submit("b", 4)
    later(h, clock, 2.0)
    assert h.core.open_round == 5  # closed at its deadline, without lazy
    h.core.leave(h.ids["lazy"], "test")
    later(h, clock, 16.0)
    c = h.join("c")
    assert c["first_round"] == 5 and h.core.members[c["node_id"]].holds_state is False
    assert len(b"".join(p["data"] for p in h.core.fetch_state(c["node_id"], 0))) > 0  # the whole state
    h.submit("a", 5)
    assert h.core.deadline == pytest.approx(clock.t + 10.0)  # 0.5 × the median round period, 20 s
    assert h.core.deadline_reason == "first round of c: 0.5 × round period 20.00 s → 10.00 s (max 60.0 s)"
    h.submit("b", 5)
    later(h, clock, 8.0)
    assert h.core.open_round == 5  # still waiting for c (the adaptive wait alone would have closed it)
    h.submit("c", 5)
    assert h.core.open_round == 6 and h.store.recent_rounds()[-1].members == ["a", "b", "c"]
    later(h, clock, 12.0)
    # the same node restarted (same key): its next first round is not granted a longer wait again
    h.submit("a", 6)
    again = h.join("c")
    assert again["replaced"] and again["first_round"] == 7
    list(h.core.fetch_state(again["node_id"], 0))
    h.submit("b", 6)
    later(h, clock, 2.0)
    assert h.core.open_round == 7  # c's old session owed round 6: closed at the adaptive deadline
    h.submit("a", 7)
    assert h.core.deadline_reason.startswith("q1.00 of")


def test_with_overlap_a_joiners_first_round_keeps_the_adaptive_deadline(make: Callable[..., Harness],
                                                                       clock: Clock) -> None:
    """With overlap a joiner steps in at a round boundary and observes the rounds before (node/daemon.py): a round
    that waited the longest wait for it would stall every node at its next boundary."""
    h = make({"recipe": {"overlap": True}})
    for n in "ab":
        h.join(n)
    h.submit("a", 0)
    clock.advance(1.0)
    h.submit("b", 0)
    assert h.join("c")["first_round"] == 1
    h.submit("a", 1)
    assert h.core.deadline == pytest.approx(clock.t + 2.0)
    assert h.core.deadline_reason.startswith("q1.00 of")


def test_a_member_that_observes_the_open_round_is_not_waited_for_in_it(h: Harness) -> None:
    """Collecting a round without a payload (a joiner catching up or stepping in, a node skipping a round to get
    back in step) says "I sit this round out": the round closes once the others submitted, without waiting for
    its deadline, and the member is expected again in the next round."""
    for n in "abc":
        h.join(n)
    with pytest.raises(StillOpen):  # c observes round 0 before anyone submitted
        h.core.collect(h.ids["c"], 0, 0.0, False)
    h.submit("a", 0)
    assert h.core.open_round == 0
    h.submit("b", 0)
    assert h.core.open_round == 1  # closed at b's payload: c is not awaited
    assert h.store.recent_rounds()[-1].reason == "all 2 live members submitted"
    h.submit("a", 1)
    h.submit("b", 1)
    assert h.core.open_round == 1  # c is a member of round 1 again
    result, _ = h.core.collect(h.ids["c"], 1, 0.0, False)  # observing closes it at once
    assert h.core.open_round == 2 and list(result.frames) == ["a", "b"]


def test_lease_expiry_by_tick_removes_a_silent_member(h: Harness, clock: Clock) -> None:
    for n in "abc":
        h.join(n)
    clock.advance(10.0)
    h.core.heartbeat(h.ids["a"])
    h.core.heartbeat(h.ids["b"])
    h.core.tick()
    assert len(h.core.members) == 3  # silent exactly lease_s: still a member
    clock.advance(0.5)
    h.core.tick()
    assert {m.name for m in h.core.members.values()} == {"a", "b"}
    assert {m.name for m in h.store.load_members(now=0.0).values()} == {"a", "b"}
    with pytest.raises(UnknownNode):
        h.core.heartbeat(h.ids["c"])
    assert h.core.heartbeat(h.ids["a"]) == {"current_round": 0, "committed_rounds": 0, "lease_ms": 10_000}


def test_lease_expiry_can_close_a_round(h: Harness, clock: Clock) -> None:
    for n in "abc":
        h.join(n)
    h.submit("a", 0)
    h.submit("b", 0)
    clock.advance(4.9)  # before the 5 s deadline: c is awaited
    h.core.tick()
    assert h.core.open_round == 0
    clock.advance(5.6)  # c silent 10.5 s > lease; a and b renewed just now
    h.core.heartbeat(h.ids["a"]), h.core.heartbeat(h.ids["b"])
    h.core.tick()
    assert h.core.open_round == 1 and h.ids["c"] not in h.core.members
    row = h.store.recent_rounds()[-1]
    assert row.members == ["a", "b"] and row.reason == "all 2 live members submitted"


def test_leave_is_immediate_and_can_close_a_round(h: Harness) -> None:
    for n in "abc":
        h.join(n)
    h.submit("a", 0)
    h.submit("b", 0)
    assert h.core.open_round == 0
    h.core.leave(h.ids["c"], "shutting down")
    assert h.ids["c"] not in h.core.members
    assert h.core.open_round == 1
    row = h.store.recent_rounds()[-1]
    assert row.members == ["a", "b"] and row.reason == "all 2 live members submitted"
    with pytest.raises(UnknownNode):
        h.core.leave(h.ids["c"], "again")


def test_leave_drops_a_partial_upload(h: Harness) -> None:
    h.join("a"), h.join("b")
    with pytest.raises(Truncated):
        h.core.submit(iter(h.chunks("a", 0, b"z" * 100, total=1000)))
    h.core.leave(h.ids["a"], "bye")
    assert h.core.uploads == {}


@pytest.mark.parametrize("how", ["leave", "lease"])
def test_payload_of_a_member_gone_before_commit_still_counts(h: Harness, clock: Clock, how: str) -> None:
    for n in "abc":
        h.join(n)
    fa = h.frame("a", 0)
    h.submit("a", 0, fa)
    if how == "leave":
        h.core.leave(h.ids["a"], "bye")
    else:
        clock.advance(4.0)
        h.core.heartbeat(h.ids["b"]), h.core.heartbeat(h.ids["c"])
        h.submit("b", 0)
        clock.advance(6.5)  # a silent 10.5 s, b and c 6.5 s; the 5 s deadline passed with 2 ≥ min_nodes
        h.core.heartbeat(h.ids["b"]), h.core.heartbeat(h.ids["c"])
        h.core.tick()
    assert h.ids["a"] not in h.core.members
    if how == "leave":
        h.submit("b", 0)
        assert h.core.open_round == 0
        h.submit("c", 0)
    assert h.core.open_round == 1
    result, to_send = h.core.collect(h.ids["b"], 0, 0.0, True)
    want = ["a", "b", "c"] if how == "leave" else ["a", "b"]
    assert list(result.frames) == want and result.frames["a"] == fa and to_send == [n for n in want if n != "b"]
    assert h.store.recent_rounds()[-1].members == want


def test_the_first_node_up_does_not_commit_round_0_alone(h: Harness, clock: Clock) -> None:
    h.join("a")
    h.submit("a", 0)
    clock.advance(30.0)
    h.core.heartbeat(h.ids["a"])
    h.core.tick()
    assert h.core.open_round == 0  # min_nodes 2: the run has not started
    assert h.join("b")["first_round"] == 0  # so a late starter still enters round 0
    h.submit("b", 0)
    assert h.core.open_round == 1 and h.store.recent_rounds()[-1].members == ["a", "b"]


@pytest.mark.parametrize("result", ["relay", "compressed"])
def test_a_restarted_member_cannot_add_a_second_frame_under_its_name(make: Callable[..., Harness], result: str) -> None:
    """While the run waits for min_nodes, a node restarted after its frame was taken joins again under its name (a
    new session, still in round 0) and offers the round again: one frame per name — the second is refused, the round
    holds the first, and it counts once toward the quorum (min_nodes 3: a and b are two members, not three)."""
    h = make({"run": {"recipe": "sign-nesterov"}, "rounds": {"result": result},
              "membership": {"min_nodes": 3, "max_nodes": 4}})
    h.join("a"), h.join("b")
    first = h.frame("a", 0)
    h.submit("a", 0, first)
    assert h.join("a")["first_round"] == 0  # the restart: a new session under the same name, the run not started
    with pytest.raises(Conflict, match="already"):
        h.submit("a", 0)
    assert h.submit("a", 0, first)["accepted"]  # the frame it sent before the restart: taken, as one
    h.submit("b", 0)
    assert h.core.open_round == 0 and sorted(h.core.status()["submitted"]) == ["a", "b"]  # two, below min_nodes
    h.join("c")
    h.submit("c", 0)
    assert h.core.open_round == 1
    assert h.store.record(0)["frames"]["a"] == first
