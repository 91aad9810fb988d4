"""The serverless round's agreement (node/transport/dht_agreement.py): pure functions of (now, records, config),
driven by synthetic records and a fake clock (plain floats), without a DHT. Every test checks the decision kind
and the reason a peer would log."""
from __future__ import annotations

import hashlib
import itertools
from typing import Any

import pytest

from node.transport.dht_agreement import (AgreeKind, Announcement, CloseView, GroupKind, HaveList, LateKind, Outcome,
                                          ReferenceKind, SettleKind, Verdict, adopt_sources, agree_step, agreed_set,
                                          choose_outcome, close_group, close_wait, commit_reason, late_senders,
                                          live_members, parse_haves, round_joiners, same_reference, settle_step,
                                          take_late)


def sha(sender: str) -> str:
    """A sender's frame digest (the records carry real sha256 hex: a malformed one is refused)."""
    return hashlib.sha256(sender.encode()).hexdigest()


def announcement(sender: str, fp: str = "ref", digest: str | None = None) -> list[Any]:
    """As read back from the DHT (msgpack gives lists)."""
    return [f"peer-{sender}", 1000, digest or sha(sender), fp]


def announced(*senders: str, fp: str = "ref") -> dict[str, Announcement]:
    parsed = {s: Announcement.parse(announcement(s, fp)) for s in senders}
    return {s: a for s, a in parsed.items() if a is not None}


def pairs(*senders: str) -> frozenset[tuple[str, str]]:
    return frozenset((s, sha(s)) for s in senders)


def have(held: tuple[str, ...], group: tuple[str, ...]) -> HaveList:
    return HaveList(pairs(*held), frozenset(group))


def done(publisher: str, at: float, committed: bool = True, fp: str = "ref", held: tuple[str, ...] = ("a",)) -> Any:
    return Outcome(publisher, f"peer-{publisher}", fp, at, committed, pairs(*held)).encode()


# -- records ------------------------------------------------------------------------------------------------
def test_records_round_trip_and_malformed_ones_are_ignored() -> None:
    assert Announcement.parse(announcement("a")) == Announcement("peer-a", 1000, sha("a"), "ref")
    for bad in (None, "x", ["p", 1, "s"], ["p", "1000", "s", "f"], ["p", 1, "s", None], [1, 1, "s", "f"]):
        assert Announcement.parse(bad) is None, bad
    h = have(("a", "b"), ("a", "b", "c"))
    assert HaveList.parse(h.encode()) == h
    for bad in ([[["a"]], ["a"]], [[["a", "s"]], "a"], [[["a", "s"]]], [[["a", 1]], ["a"]]):
        assert HaveList.parse(bad) is None, bad
    o = Outcome("a", "peer-a", "ref", 12.5, True, pairs("a", "b"))
    back = Outcome.parse("a", o.encode())
    assert back is not None and (back.pairs, back.published_at, back.sources) == (o.pairs, 12.5, {"a": "peer-a"})
    assert Outcome.parse("a", ["peer-a", "ref", "soon", True, [], []]) is None
    assert Outcome.parse("a", ["peer-a", "ref", 1.0, True, []]) is None  # no confirming members: an older format
    assert Outcome.parse("a", ["peer-a", "ref", 1.0, 1, []]) is None  # committed must be a bool


def test_live_members_are_heartbeats_that_take_part_in_the_round() -> None:
    beats = {"a": ["pa", "live", 0], "left": ["pl", "left", 0], "joiner": ["pj", "live", 5], "odd": ["po", "live", "0"],
             "dead": ["pd", False, 0], "fetching": ["pf", "joining", 0]}
    assert live_members(beats, 4) == {"a"}  # a leave is not live, nor one fetching the state; a joiner counts from
    # its round
    assert live_members(beats, 5) == {"a", "joiner"}
    assert live_members(beats) == {"a", "joiner"}


def test_have_lists_of_senders_outside_the_group_are_not_read() -> None:
    records = {"a": have(("a",), ("a",)).encode(), "x": have(("x",), ("x",)).encode(), "b": "garbage"}
    assert parse_haves(records, ["a", "b"]) == {"a": have(("a",), ("a",))}


# -- closing ------------------------------------------------------------------------------------------------
def test_a_failed_read_keeps_the_last_view_and_never_shrinks_it() -> None:
    beats = {"a": ["pa", "live", 0], "b": ["pb", "live", 0]}
    view = CloseView().see(10.0, {"a": announcement("a")}, beats)
    assert view.first_seen == 10.0 and set(view.announced) == {"a"} and view.live(0) == {"a", "b"}
    failed = view.see(11.0, None, None)  # both reads failed
    assert set(failed.announced) == {"a"} and failed.live(0) == {"a", "b"} and failed.first_seen == 10.0
    grown = failed.see(12.5, {"a": announcement("a"), "b": announcement("b")}, None)
    assert set(grown.announced) == {"a", "b"} and grown.live(0) == {"a", "b"}
    assert grown.spread == pytest.approx(2.5)  # first to last new announcement
    assert grown.see(13.0, {"a": announcement("a"), "b": announcement("b")}, beats).spread == pytest.approx(2.5)


def test_a_failed_heartbeat_read_is_not_no_live_peers() -> None:
    """Had every heartbeat read failed, ``live`` is unknown: the round must not close on the first announcement as
    if nobody else were live — while a successful read that finds nobody else live does close it."""
    view = CloseView().see(0.0, {"a": announcement("a")}, None)
    assert view.live(0) is None
    d = close_group(0.1, view.first_seen, view.announced, view.live(0), set(), wait=2.0, deadline=30.0)
    assert not d.close and d.kind is GroupKind.LIVE_UNKNOWN
    assert d.reason == "no heartbeat read succeeded: not closing early on 1 announcement(s)"
    alone = close_group(0.1, 0.0, {"a"}, set(), set(), wait=2.0, deadline=30.0)
    assert alone.close and alone.kind is GroupKind.ALL_ANNOUNCED
    # and the wait still ends it, naming what it did not know
    late = close_group(2.0, 0.0, {"a"}, None, set(), wait=2.0, deadline=30.0, why="fixed 2.0 s")
    assert late.close and late.kind is GroupKind.WAIT_OVER
    assert late.reason == ("closing without peers unknown (no heartbeat read succeeded) after the round's wait "
                           "(fixed 2.0 s)")


def test_the_round_closes_when_every_live_peer_announced() -> None:
    d = close_group(0.5, 0.0, {"a", "b"}, {"a", "b"}, set(), wait=2.0, deadline=30.0)
    assert d.close and d.kind is GroupKind.ALL_ANNOUNCED and d.missing == ()
    assert d.group == ("a", "b") and d.reason == "all 2 expected peers announced"


def test_a_missing_peer_is_waited_for_until_the_rounds_wait_is_over() -> None:
    waiting = close_group(1.99, 0.0, {"a"}, {"a", "b"}, set(), wait=2.0, deadline=30.0, why="fixed 2.0 s")
    assert not waiting.close and waiting.kind is GroupKind.WAITING and waiting.missing == ("b",)
    assert waiting.reason == "waiting for b"
    over = close_group(2.0, 0.0, {"a"}, {"a", "b"}, set(), wait=2.0, deadline=30.0, why="fixed 2.0 s")
    assert over.close and over.kind is GroupKind.WAIT_OVER and over.missing == ("b",) and over.group == ("a",)
    assert over.reason == "closing without b after the round's wait (fixed 2.0 s)"


def test_nobody_announcing_stays_open_until_the_callers_deadline() -> None:
    d = close_group(5.0, None, set(), {"a"}, set(), wait=2.0, deadline=30.0)
    assert not d.close and d.kind is GroupKind.NO_ANNOUNCEMENT and d.reason == "no announcement yet"
    end = close_group(30.0, None, set(), {"a"}, set(), wait=2.0, deadline=30.0)
    assert end.close and end.kind is GroupKind.DEADLINE and end.group == ()
    assert end.reason == "closing without a at the caller's deadline"


def test_a_joiner_is_waited_for_with_the_longest_wait() -> None:
    joiners = round_joiners(3, given={"j1"}, wants={"j2": 3, "j3": -1, "j4": 2, "j5": 4})
    assert joiners == {"j1", "j2"}  # given this round's state, or downloading it now
    wait, why = close_wait(2.0, "fixed 2.0 s", 60.0, joiners)
    assert (wait, why) == (60.0, "the longest wait: j1, j2 fetched the state")
    assert close_wait(2.0, "fixed 2.0 s", 60.0, set()) == (2.0, "fixed 2.0 s")
    assert close_wait(2.0, "fixed 2.0 s", 2.0, joiners) == (2.0, "fixed 2.0 s")  # nothing longer to wait
    d = close_group(10.0, 0.0, {"a"}, {"a"}, joiners, wait, deadline=100.0)  # not heartbeating yet: still expected
    assert not d.close and d.kind is GroupKind.WAITING and d.missing == ("j1", "j2")
    assert close_group(10.0, 0.0, {"a", "j1", "j2"}, {"a"}, joiners, wait, 100.0).kind is GroupKind.ALL_ANNOUNCED


# -- the reference ------------------------------------------------------------------------------------------
def test_without_our_fingerprint_or_with_one_reference_everyone_stays() -> None:
    group = {**announced("a", "b"), **announced("c", fp="")}
    for mine in ("", "ref"):
        d = same_reference(mine, group)
        assert d.kind is ReferenceKind.UNCHECKED and set(d.members) == {"a", "b", "c"} and d.dropped == ()


def test_a_member_with_another_reference_is_left_out() -> None:
    d = same_reference("ref-A", {**announced("a", "b", fp="ref-A"), **announced("c", fp="ref-B")})
    assert d.kind is ReferenceKind.FILTERED and set(d.members) == {"a", "b"}
    assert d.dropped == (("c", "its reference ref-B differs from ours ref-A (a diverged replica)"),)


def test_a_diverged_reference_is_told_to_fetch_the_state() -> None:
    d = same_reference("ref-B", {**announced("a", "b", fp="ref-A"), **announced("c", fp="ref-B")})
    assert d.kind is ReferenceKind.DIVERGED and d.members == {}
    assert d.reason == ("this replica's reference ref-B differs from the run's ref-A (held by 2 members): fetching "
                        "the state")


def test_a_tie_between_references_goes_the_same_way_for_both_sides() -> None:
    group = {**announced("a", fp="ref-A"), **announced("b", fp="ref-B")}
    assert same_reference("ref-B", group).kind is ReferenceKind.FILTERED  # the larger string wins the tie
    assert same_reference("ref-A", group).kind is ReferenceKind.DIVERGED


# -- a decided round ----------------------------------------------------------------------------------------
def test_conflicting_outcomes_resolve_to_the_earliest_for_every_reader() -> None:
    records = {"w1": done("w1", 1000.0, held=("a",)), "w0": done("w0", 999.0, held=("a", "b")),
               "w2": done("w2", 998.0, committed=False, held=())}  # not committed: never the outcome
    for order in itertools.permutations(records):  # whatever order a reader's DHT returns them in
        best = choose_outcome({k: records[k] for k in order}, "ref")
        assert best is not None and best.publisher == "w0" and best.pairs == pairs("a", "b")
        assert best.sources == {"w0": "peer-w0"}


def test_a_tie_goes_to_the_publisher_name_and_every_publisher_of_it_is_a_source() -> None:
    records = {"b": done("b", 5.0), "a": done("a", 5.0), "c": done("c", 6.0), "d": done("d", 7.0, held=("x",))}
    best = choose_outcome(records, "ref")
    assert best is not None and best.publisher == "a"
    assert best.sources == {"a": "peer-a", "b": "peer-b", "c": "peer-c"}  # d published other frames


def test_only_outcomes_from_our_reference_decide_the_round() -> None:
    records = {"x": done("x", 1.0, fp="other"), "y": done("y", 2.0, fp=""), "z": ["malformed"]}
    best = choose_outcome(records, "ref")
    assert best is not None and best.publisher == "y"  # "" was not checked: it counts with ours
    assert choose_outcome({"x": done("x", 1.0, fp="other")}, "ref") is None
    anyone = choose_outcome({"x": done("x", 1.0, fp="other")}, "")  # an observer without a reference takes it
    assert anyone is not None and anyone.publisher == "x"
    assert choose_outcome({}, "ref") is None


# -- late senders -------------------------------------------------------------------------------------------
def test_a_late_sender_another_member_took_in_is_taken_in() -> None:
    """b closed without c (it announced after b's wait); a waited for c (a joiner it gave the state). b learns of c
    from a's have-list group, reads c's announcement and takes it in; the agree wait then wants b's list again."""
    group = announced("a", "b")
    haves = {"a": have(("a", "b", "c"), ("a", "b", "c")), "b": have(("a", "b"), ("a", "b"))}
    late = late_senders(haves, group, refused=set())
    assert late == {"c"}
    step = agree_step(1.0, 10.0, haves, group, refused=set())
    assert not step.done and step.kind is AgreeKind.LATE_PENDING and step.reason == "waiting to take in c"
    decision = take_late(late, {"a": announcement("a"), "c": announcement("c")}, "ref")
    assert decision.verdicts == {"c": LateKind.TAKEN} and set(decision.taken) == {"c"} and not decision.refused
    assert decision.reason == "taken: c"
    grown = {**group, **decision.taken}
    haves["b"] = have(("a", "b", "c"), tuple(grown))  # b fetched c's frame and listed it again
    step = agree_step(1.5, 10.0, haves, grown, refused=set())
    assert not step.done and step.reason == "waiting for the have-lists of c"  # c is a member now: its list counts
    haves["c"] = have(("a", "b", "c"), ("a", "b", "c"))
    done_step = agree_step(1.6, 10.0, haves, grown, refused=set())
    assert done_step.done and done_step.kind is AgreeKind.ALL_LISTED
    assert agreed_set(haves["b"].held, haves, grown, 1).pairs == pairs("a", "b", "c")


def test_late_senders_of_another_reference_are_refused_and_unreadable_ones_asked_again() -> None:
    seen = {"c": announcement("c", fp="other"), "d": ["garbage"]}
    decision = take_late({"c", "d", "e"}, seen, "ref")
    assert decision.verdicts == {"c": LateKind.OTHER_REFERENCE, "d": LateKind.NOT_READABLE,
                                 "e": LateKind.NOT_READABLE}
    assert decision.refused == {"c"} and decision.taken == {}
    assert decision.reason == "other_reference: c; not_readable: d, e"
    haves = {"a": have(("a",), ("a", "b", "c")), "b": have(("a",), ("a", "b"))}
    assert late_senders(haves, {"a", "b"}, refused=decision.refused) == set()  # a refused one is not asked again


# -- waiting for have-lists ---------------------------------------------------------------------------------
def test_the_agree_wait_ends_when_every_member_listed_the_whole_group() -> None:
    group = announced("a", "b")
    full = {"a": have(("a", "b"), ("a", "b")), "b": have(("a",), ("a", "b"))}
    step = agree_step(0.0, 10.0, full, group, set())
    assert step.done and step.kind is AgreeKind.ALL_LISTED and step.reason == "all 2 members listed what they hold"
    missing = agree_step(0.0, 10.0, {"a": full["a"]}, group, set())
    assert not missing.done and missing.kind is AgreeKind.LISTS_MISSING
    assert missing.reason == "waiting for the have-lists of b"
    smaller = agree_step(0.0, 10.0, {"a": full["a"], "b": have(("b",), ("b",))}, group, set())
    assert not smaller.done and smaller.kind is AgreeKind.LISTS_MISSING  # b's list is over a group without a
    timed_out = agree_step(10.0, 10.0, {"a": full["a"]}, group, set())
    assert timed_out.done and timed_out.kind is AgreeKind.TIMED_OUT and timed_out.reason == "the agree wait ran out"


def test_an_observer_waits_only_for_an_outcome() -> None:
    group = announced("a", "b")
    full = {"a": have(("a", "b"), ("a", "b")), "b": have(("a", "b"), ("a", "b"))}
    step = agree_step(0.0, 10.0, full, group, set(), member=False)
    assert not step.done and step.kind is AgreeKind.OBSERVING
    assert agree_step(10.0, 10.0, full, group, set(), member=False).kind is AgreeKind.TIMED_OUT


# -- the agreed set -----------------------------------------------------------------------------------------
def test_the_agreed_set_is_what_every_listing_member_holds() -> None:
    group = announced("a", "b", "c")
    haves = {"a": have(("a", "b", "c"), ("a", "b", "c")), "b": have(("a", "b"), ("a", "b", "c")),
             "c": have(("a", "b", "c"), ("a", "b", "c")), "x": have(("x",), ("x",))}  # x is not a member
    d = agreed_set(pairs("a", "b", "c"), haves, group, min_members=1)
    assert d.kind is Verdict.COMMIT and d.pairs == pairs("a", "b")  # b tried and failed to get c's frame
    assert d.dropped == (("c", "another member does not hold it"),)
    assert d.confirmed == {"a", "b", "c"} and d.settle_with == {"a", "b", "c"}
    assert d.reason == "2 frame(s) held by all 3 listing member(s)"


def test_a_member_that_published_no_have_list_is_left_out_and_does_not_constrain_the_rest() -> None:
    group = announced("a", "b", "c")
    haves = {"a": have(("a", "b", "c"), ("a", "b", "c")), "b": have(("a", "b", "c"), ("a", "b", "c"))}
    d = agreed_set(pairs("a", "b", "c"), haves, group, min_members=2)
    assert d.kind is Verdict.COMMIT and d.pairs == pairs("a", "b")
    assert d.dropped == (("c", "published no have-list in time"),)
    assert d.settle_with == {"a", "b", "c"}  # c may have read our lists and published a larger outcome: wait for it


def test_no_frame_held_by_every_member_commits_nothing() -> None:
    haves = {"a": have(("a",), ("a", "b")), "b": have(("b",), ("a", "b"))}
    d = agreed_set(pairs("a"), haves, announced("a", "b"), min_members=1)
    assert d.kind is Verdict.NO_COMMON_FRAME and d.pairs == frozenset()
    assert d.reason == "no frame is held by every member"


def test_a_quorum_below_min_nodes_does_not_commit() -> None:
    """A peer cut off from the others agrees with itself alone: it must not go on without the run."""
    d = agreed_set(pairs("a"), {"a": have(("a",), ("a",))}, announced("a"), min_members=2)
    assert d.kind is Verdict.NO_QUORUM and d.pairs == frozenset()
    assert d.reason == "only 1 member(s) agreed, fewer than the run's min_nodes 2"
    assert agreed_set(pairs("a"), {"a": have(("a",), ("a",))}, announced("a"), 1).kind is Verdict.COMMIT


# -- settling and adopting ----------------------------------------------------------------------------------
def test_the_settle_wait_ends_when_every_member_we_agreed_with_published() -> None:
    step = settle_step(0.0, 2.0, {"a", "b"}, {"a", "b", "c"}, me="c")
    assert step.done and step.kind is SettleKind.ALL_PUBLISHED
    waiting = settle_step(0.0, 2.0, {"c"}, {"a", "b", "c"}, me="c")
    assert not waiting.done and waiting.kind is SettleKind.WAITING
    assert waiting.reason == "waiting for the outcomes of a, b"
    over = settle_step(2.0, 2.0, {"c"}, {"a", "b", "c"}, me="c")
    assert over.done and over.kind is SettleKind.TIMED_OUT
    assert over.reason == "no outcome from a, b within the settle wait"


def test_adopted_frames_come_from_their_sender_first_then_from_every_publisher() -> None:
    outcome = Outcome("p", "peer-p", "ref", 1.0, True, pairs("a", "b"), sources={"p": "peer-p", "q": "peer-q"})
    group = {**announced("a"), "b": Announcement("peer-b", 10, "a-newer-frame", "ref")}  # b retried the round
    assert adopt_sources(outcome, group) == {"a": (["peer-a", "peer-p", "peer-q"], None, sha("a")),
                                             "b": (["peer-p", "peer-q"], None, sha("b"))}
    # the members whose have-lists gave the outcome hold its frames too: after its publishers, once each
    confirmed = Outcome("p", "peer-p", "ref", 1.0, True, pairs("a", "b"), confirmed=frozenset({"a", "b", "p"}),
                        sources={"p": "peer-p"})
    group = {**announced("a"), **announced("b"), "p": Announcement("peer-p", 10, sha("p"), "ref")}
    assert adopt_sources(confirmed, group) == {"a": (["peer-a", "peer-p", "peer-b"], None, sha("a")),
                                               "b": (["peer-b", "peer-p", "peer-a"], None, sha("b"))}
    assert commit_reason({"a", "b"}, {"a", "b"}) == "every announced member agreed"
    assert commit_reason({"a", "b", "c"}, {"b"}) == "committed without a, c"


def test_a_member_whose_list_came_too_late_is_waited_for_in_the_settle_wait() -> None:
    """A replica split (rejoin test, round 24: d1 applied [d1, d2], d0 [d0, d1, d2]): d1's agree wait ran out before
    it read d0's have-list, so it committed its frames from d1 and d2's lists; d0, which read every list, committed
    all three — and earlier. The settle wait was for the members d1 agreed with only, so d1 stopped as soon as d2
    published and never saw d0's outcome, which d0 and d2 took as the round's (the earliest). d1 must wait for
    every member of the group before it chooses."""
    group = announced("d0", "d1", "d2")
    full = have(("d0", "d1", "d2"), ("d0", "d1", "d2"))
    d1 = agreed_set(pairs("d0", "d1", "d2"), {"d1": full, "d2": full}, group, min_members=2, voters=3)
    assert d1.kind is Verdict.COMMIT and d1.pairs == pairs("d1", "d2")  # without d0: no list from it in time
    d0 = agreed_set(pairs("d0", "d1", "d2"), {"d0": full, "d1": full, "d2": full}, group, min_members=2, voters=3)
    assert d0.kind is Verdict.COMMIT and d0.pairs == pairs("d0", "d1", "d2")
    waiting = settle_step(0.0, 2.0, {"d1", "d2"}, d1.settle_with, me="d1")
    assert not waiting.done and waiting.reason == "waiting for the outcomes of d0"
    records = {"d0": Outcome("d0", "peer-d0", "ref", 100.0, True, d0.pairs, d0.confirmed).encode(),
               "d1": Outcome("d1", "peer-d1", "ref", 101.0, True, d1.pairs, d1.confirmed).encode()}
    assert settle_step(0.5, 2.0, set(records) | {"d2"}, d1.settle_with, me="d1").done
    best = choose_outcome(records, "ref")  # seen, the earliest is every reader's: d1 applies d0's outcome too
    assert best is not None and best.pairs == pairs("d0", "d1", "d2")
