"""What one member cannot forge (node/transport/dht_quorum.py): pure rules over synthetic signed-and-opened records —
an outcome counts only when its confirming members' have-lists give exactly its frames and they are a quorum; a state
offer only when more than half of the other live members vouch for it; the run's round only as more than half of
the other live members entered it."""
from __future__ import annotations

import hashlib

from node.transport.dht_agreement import Announcement, HaveList, Outcome, agreed_set
from node.transport.dht_quorum import (CLOCK_SKEW_S, OfferKey, Support, check_outcome, derive, offer_support, quorum,
                                       round_outcome, run_progress, supported_outcomes)

NOW, TTL = 1000.0, 60.0


def sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def pairs(*senders: str) -> frozenset[tuple[str, str]]:
    return frozenset((s, sha(s)) for s in senders)


def have(held: tuple[str, ...], group: tuple[str, ...] = ("a", "b", "c")) -> HaveList:
    return HaveList(pairs(*held), frozenset(group))


def outcome(publisher: str, held: tuple[str, ...], confirmed: tuple[str, ...], at: float = NOW) -> Outcome:
    return Outcome(publisher, f"peer-{publisher}", "ref", at, True, pairs(*held), frozenset(confirmed))


HAVES = {"a": have(("a", "b", "c")), "b": have(("a", "b", "c")), "c": have(("a", "c"))}  # c could not get b's frame


def test_a_quorum_is_more_than_half_of_the_voters_and_at_least_min_nodes() -> None:
    assert [quorum(v, 1) for v in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]
    assert quorum(3, 3) == 3 and quorum(1, 2) == 2


def test_the_outcome_the_members_agreed_counts_and_matches_agreed_set() -> None:
    """What ``agreed_set`` gives a member is exactly what ``check_outcome`` accepts from it."""
    agreed = agreed_set(pairs("a", "b", "c"), HAVES, ["a", "b", "c"], min_members=1, voters=3)
    assert agreed.pairs == pairs("a", "c") == derive(agreed.confirmed, HAVES)
    honest = outcome("a", ("a", "c"), tuple(agreed.confirmed))
    assert check_outcome(honest, HAVES, voters=3, min_members=1, now=NOW, max_age_s=TTL).kind is Support.SUPPORTED


def test_a_forged_outcome_does_not_count_whatever_it_claims() -> None:
    # only the forger's frame, though every member holds the others': not what the lists give
    subset = outcome("a", ("a",), ("a", "b", "c"))
    assert check_outcome(subset, HAVES, 3, 1, NOW, TTL).kind is Support.NOT_DERIVED
    # a frame nobody listed
    extra = Outcome("a", "peer-a", "ref", NOW, True, pairs("a", "c") | {("x", sha("x"))}, frozenset("abc"))
    assert check_outcome(extra, HAVES, 3, 1, NOW, TTL).kind is Support.NOT_DERIVED
    # confirmed by itself alone: below the quorum of three voters
    alone = outcome("a", ("a",), ("a",))
    decision = check_outcome(alone, {"a": have(("a",))}, 3, 1, NOW, TTL)
    assert decision.kind is Support.TOO_FEW and decision.rejected
    assert "the quorum is 2 of 3 voters" in decision.reason
    # naming members it is not among
    assert check_outcome(outcome("x", ("a", "c"), ("a", "c")), HAVES, 3, 1, NOW, TTL).kind is Support.NOT_CONFIRMING
    # back-dated to win "earliest published", or from the future
    for at in (NOW - TTL - CLOCK_SKEW_S - 1, NOW + CLOCK_SKEW_S + 1):
        assert check_outcome(outcome("a", ("a", "c"), ("a", "b", "c"), at), HAVES, 3, 1, NOW,
                             TTL).kind is Support.OUT_OF_WINDOW


def test_an_outcome_whose_lists_are_not_visible_yet_is_pending_not_rejected() -> None:
    o = outcome("a", ("a", "c"), ("a", "b", "c"))
    decision = check_outcome(o, {"a": HAVES["a"]}, 3, 1, NOW, TTL)
    assert decision.kind is Support.PENDING and not decision.rejected
    assert decision.reason == "waiting for the have-lists of b, c"


def test_supported_outcomes_skip_uncommitted_records_and_explain_the_rest() -> None:
    good = outcome("a", ("a", "c"), ("a", "b", "c"))
    forged = outcome("b", ("b",), ("a", "b", "c"))
    not_committed = Outcome("c", "peer-c", "ref", NOW, False, frozenset(), frozenset())
    ok, bad = supported_outcomes({"a": good, "b": forged, "c": not_committed}, HAVES, 3, 1, NOW, TTL)
    assert ok == {"a": good} and set(bad) == {"b"} and bad["b"].kind is Support.NOT_DERIVED


def test_a_state_offer_needs_more_than_half_of_the_other_live_members() -> None:
    offer = OfferKey(7, 100, sha("blob"), "fp7")
    other = OfferKey(99999, 100, sha("zeros"), "fp-zero")
    assert offer_support(offer, {"a": offer}, {}, live_others=1)[0]  # the one other member: enough
    assert not offer_support(offer, {"a": offer}, {}, live_others=3)[0]
    ok, why = offer_support(offer, {"a": offer}, {"b": Announcement("pb", 10, sha("b"), "fp7")}, live_others=3)
    assert ok and "vouched for by 2 member(s) (a, b; 2 needed)" in why  # b announced round 7 from that reference
    assert not offer_support(other, {"a": offer, "r": other}, {"b": Announcement("pb", 10, sha("b"), "fp7")}, 3)[0]


def test_the_runs_round_is_what_more_than_half_of_the_other_live_members_entered() -> None:
    assert run_progress({}, []) is None
    assert run_progress({"a": 5}, ["a"]) == 5
    assert run_progress({"a": 5, "rogue": 10 ** 9}, ["a", "rogue"]) == 5  # one member's word moves nobody
    assert run_progress({"a": 5, "b": 6, "rogue": 10 ** 9}, ["a", "b", "rogue"]) == 6
    assert run_progress({"a": 5, "gone": 9}, ["a"]) == 5  # a member no longer live does not count


def test_an_earlier_outcome_not_yet_supported_for_one_reader_leaves_the_round_undecided_for_it() -> None:
    """A replica split: d0 read every have-list and published [d0, d1, d2] first; d1, whose agree wait ran out
    before it read d0's list, published [d1, d2] (a subset outcome derives from d1 and d2's lists: both valid). d0
    and d2 see both supported and take the earliest, d0's. To d1, d0's outcome is only pending (d0's list is not
    visible to it yet): taking its own, the only supported one it sees, applied another member set for the same
    round. It must wait (the round stays undecided and is read again) until d0's outcome is supported."""
    group = ("d0", "d1", "d2")
    full = have(group, group)
    first = outcome("d0", group, group, at=NOW - 2.0)
    later = outcome("d1", ("d1", "d2"), ("d1", "d2"), at=NOW - 1.0)
    assert later.pairs == agreed_set(pairs(*group), {"d1": full, "d2": full}, group, 2, voters=3).pairs
    outcomes = {"d0": first, "d1": later}
    done = {p: o.encode() for p, o in outcomes.items()}
    everyone = {"d0": full, "d1": full, "d2": full}
    seen, _ = round_outcome(done, outcomes, everyone, 3, 2, NOW, TTL, "ref")  # d0 and d2
    assert seen is not None and seen.publisher == "d0" and seen.pairs == pairs(*group)
    without_d0 = {"d1": full, "d2": full}  # d1, before d0's list reaches it
    undecided, why = round_outcome(done, outcomes, without_d0, 3, 2, NOW, TTL, "ref")
    assert undecided is None and why["d0"].kind is Support.PENDING
    alone, _ = round_outcome({"d1": done["d1"]}, {"d1": later}, without_d0, 3, 2, NOW, TTL, "ref")
    assert alone is not None and alone.publisher == "d1"  # no earlier outcome: its own is the round's
    # a reader that does not see d1's list yet: d1's outcome is pending but later, so it holds nothing back
    without_d1, why = round_outcome(done, outcomes, {"d0": full, "d2": full}, 3, 2, NOW, TTL, "ref")
    assert why["d1"].kind is Support.PENDING and why["d0"].kind is Support.PENDING  # d0's names d1 too
    assert without_d1 is None
    early = outcome("d0", ("d0", "d2"), ("d0", "d2"), at=NOW - 2.0)
    got, why = round_outcome({"d0": early.encode(), "d1": done["d1"]}, {"d0": early, "d1": later},
                             {"d0": full, "d2": full}, 3, 2, NOW, TTL, "ref")
    assert why["d1"].kind is Support.PENDING and got is not None and got.publisher == "d0"
