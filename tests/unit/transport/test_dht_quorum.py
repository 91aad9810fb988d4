"""What one member cannot forge (node/transport/dht_quorum.py): pure rules over synthetic signed-and-opened records —
an outcome counts only when its confirming members' have-lists give exactly its frames and they are a quorum; a state
offer only when more than half of the other live members vouch for it; the run's round only as more than half of
the other live members entered it."""
from __future__ import annotations

import hashlib

from node.transport.dht_agreement import Announcement, HaveList, Outcome, agreed_set
from node.transport.dht_quorum import (CLOCK_SKEW_S, OfferKey, Support, check_outcome, derive, offer_support, quorum,
                                       run_progress, supported_outcomes)

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
