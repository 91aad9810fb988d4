"""What one member cannot forge: the rules that decide whether a signed record is *supported* by the run, as pure
functions of (the records read, now, config) — like ``dht_agreement``, nothing here reads a clock or the network.

Signatures (``dht_signing``) prove who wrote a record; membership (``dht_trust``) proves the writer may write. These
rules bound what a single member's record can make the others do:

- ``check_outcome``: an outcome (``{run}/round/{r}/done``) counts only when it is exactly what its confirming members'
  signed have-lists give — the frames every one of them holds, from senders among them (``agreed_set``'s rule) — and
  those members are a quorum: at least ``min_nodes`` frames, and more than half of the round's voters (the members
  of its group whose heartbeat is live, and the reader). Its ``published_at`` must lie in a small window around now
  (it decides which of two valid outcomes is the round's, so it must not be back-dated at will). An outcome whose
  members' lists are not all visible yet is *pending*, not rejected: it is read again at the next poll.
- ``offer_support``: a state offer (``{run}/state``) is taken only when more than half of the other live members
  vouch for its (round, fingerprint): they offer the same snapshot, or they announced that round with that reference
  fingerprint. The joiner then checks the blob's sha256 and the loaded model's fingerprint.
- ``run_progress``: the round the run is in, for a node deciding whether it fell behind or where to join, is one more
  than half of the other live members have entered (with one other member, that member's): one member's
  ``progress = 10**9`` moves nobody.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from node.transport.dht_agreement import Announcement, HaveList, Outcome, Pair, choose_outcome

CLOCK_SKEW_S = 30.0  # how far apart two members' clocks may be


def quorum(voters: int, min_members: int) -> int:
    """Have-lists an outcome needs: more than half of the voters, and at least ``min_members``."""
    return max(min_members, voters // 2 + 1)


def derive(confirmed: Iterable[str], haves: Mapping[str, HaveList]) -> frozenset[Pair]:
    """The frames the have-lists of ``confirmed`` give: held by every one of them, sent by one of them."""
    members = set(confirmed)
    lists = [haves[m].held for m in sorted(members)]
    if not lists:
        return frozenset()
    common = frozenset.intersection(*lists)
    return frozenset(p for p in common if p[0] in members)


class Support(str, enum.Enum):
    SUPPORTED = "supported"
    PENDING = "pending"  # a confirming member's have-list is not visible (yet)
    NOT_DERIVED = "not_derived"  # its frames are not what its members' have-lists give
    TOO_FEW = "too_few"  # fewer confirming members than the quorum
    NOT_CONFIRMING = "not_confirming"  # the publisher is not among the members it names
    OUT_OF_WINDOW = "out_of_window"  # published_at too far from now


@dataclass(frozen=True)
class SupportDecision:
    kind: Support
    reason: str

    @property
    def rejected(self) -> bool:
        return self.kind not in (Support.SUPPORTED, Support.PENDING)


def check_outcome(outcome: Outcome, haves: Mapping[str, HaveList], voters: int, min_members: int, now: float,
                  max_age_s: float) -> SupportDecision:
    """Whether a committed ``outcome`` counts. ``voters``: the round's group members with a live heartbeat (and the
    reader); ``max_age_s``: the longest an honest outcome stays readable (the record's ttl)."""
    if not now - max_age_s - CLOCK_SKEW_S <= outcome.published_at <= now + CLOCK_SKEW_S:
        return SupportDecision(Support.OUT_OF_WINDOW, f"published_at {outcome.published_at:.1f} is outside "
                               f"[now − {max_age_s + CLOCK_SKEW_S:.0f} s, now + {CLOCK_SKEW_S:.0f} s]")
    confirmed = set(outcome.confirmed)
    if outcome.publisher not in confirmed:
        return SupportDecision(Support.NOT_CONFIRMING, f"{outcome.publisher} is not among the members it names")
    need = quorum(voters, min_members)
    if len(confirmed) < need or len(outcome.pairs) < min_members:
        return SupportDecision(Support.TOO_FEW, f"{len(confirmed)} confirming member(s) and {len(outcome.pairs)} "
                               f"frame(s); the quorum is {need} of {voters} voters (min_nodes {min_members})")
    missing = sorted(confirmed - set(haves))
    if missing:
        return SupportDecision(Support.PENDING, f"waiting for the have-lists of {', '.join(missing)}")
    if derive(confirmed, haves) != outcome.pairs:
        return SupportDecision(Support.NOT_DERIVED, "its frames are not the ones its members' have-lists hold")
    return SupportDecision(Support.SUPPORTED, f"derived from the have-lists of {len(confirmed)} members")


def supported_outcomes(outcomes: Mapping[str, Outcome], haves: Mapping[str, HaveList], voters: int,
                       min_members: int, now: float, max_age_s: float
                       ) -> tuple[dict[str, Outcome], dict[str, SupportDecision]]:
    """The committed outcomes that count, and why each other committed one does not (pending ones included)."""
    good: dict[str, Outcome] = {}
    bad: dict[str, SupportDecision] = {}
    for publisher, o in outcomes.items():
        if not o.committed:
            continue  # "not committed" records decide nothing (they only tell the others not to wait)
        decision = check_outcome(o, haves, voters, min_members, now, max_age_s)
        if decision.kind is Support.SUPPORTED:
            good[publisher] = o
        else:
            bad[publisher] = decision
    return good, bad


def round_outcome(done: Mapping[str, Any], outcomes: Mapping[str, Outcome], haves: Mapping[str, HaveList], voters: int,
                  min_members: int, now: float, max_age_s: float, mine: str
                  ) -> tuple[Outcome | None, dict[str, SupportDecision]]:
    """The round's outcome as a reader sees it (``DhtTransport._supported``): the earliest supported one
    (``choose_outcome``) — none while an outcome published earlier is still pending (its members' have-lists not
    visible to this reader yet: another reader may already have taken it). ``done``: the raw records, ``outcomes``:
    those of them that parsed. Also why each other committed outcome does not count."""
    good, bad = supported_outcomes(outcomes, haves, voters, min_members, now, max_age_s)
    pending = {p: done[p] for p, d in bad.items() if d.kind is Support.PENDING}
    return choose_outcome({p: done[p] for p in good}, mine, pending), bad


@dataclass(frozen=True)
class OfferKey:
    """What donors of one snapshot all announce."""

    committed: int
    size: int
    sha256: str
    fingerprint: str


def offer_support(offer: OfferKey, offers: Mapping[str, OfferKey], announced: Mapping[str, Announcement],
                  live_others: int) -> tuple[bool, str]:
    """Whether ``offer`` is vouched for by more than half of the ``live_others`` members (at least one):
    ``offers`` — member → the snapshot it offers; ``announced`` — member → its announcement for round
    ``offer.committed`` (its reference fingerprint before that round, i.e. after ``committed`` rounds)."""
    vouchers = {m for m, o in offers.items() if o == offer}
    vouchers |= {m for m, a in announced.items() if a.fingerprint == offer.fingerprint}
    need = max(1, live_others // 2 + 1)
    if len(vouchers) >= need:
        return True, f"vouched for by {len(vouchers)} member(s) ({', '.join(sorted(vouchers))}; {need} needed)"
    return False, f"vouched for by {len(vouchers)} member(s), {need} needed"


def run_progress(progress: Mapping[str, int], live_others: Iterable[str]) -> int | None:
    """The round the run is in by the members other than the reader: the highest round more than half of the live
    ones have entered; None when no live member recorded one."""
    values = sorted((progress[m] for m in set(live_others) if m in progress), reverse=True)
    if not values:
        return None
    return values[len(values) // 2]
