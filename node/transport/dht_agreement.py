"""The agreement of a serverless round as pure functions of (now, the records read, config).

``DhtTransport`` (dht.py) reads and writes the DHT records and moves the frames; every decision about what those
records mean is made here. Nothing here reads a clock, touches the network or mutates its arguments: each rule
returns a decision whose ``kind`` (an enum) is what the caller branches on and whose ``reason`` is for people
(logged, never parsed), as ``node/membership.py`` does for the coordinator. Tests drive the rules with synthetic
records and a fake ``now`` (tests/unit/transport/test_dht_agreement.py).

The records (msgpack values; a malformed one is ignored, never trusted):

- announcement ``{run}/round/{r}`` by sender: (peer_id, size, sha256, reference fingerprint)
- heartbeat ``{run}/peers`` by name: (peer_id, status, from_round, shard, since, rejected); status "live", "joining"
  (fetching the state: not waited for) or "left"
- have-list ``{run}/round/{r}/have`` by member: ([sender, sha256] pairs held, senders of its group)
- outcome ``{run}/round/{r}/done`` by publisher: (peer_id, fingerprint, published_at, committed, pairs, confirmed)

Records reach these rules by the writer's name only after ``dht_trust`` checked that a member of the run wrote them
(every record is stored under its writer's key and signed, ``dht_signing``); ``dht_quorum`` decides which outcomes
and state offers are supported by the members.

The rules, in the order a round runs them, and why each is what it is:

1. ``see`` + ``close_group``: close when every live peer taking part in the round (and every joiner this peer
   gave the state of this round) announced, else when the round's wait after the first announcement ran out, else
   at the caller's deadline. A failed read keeps the last view: "I could not see" must never shrink the group nor
   read as "no live peers", which would close the round on the first announcement alone. ``close_wait``: a joiner
   still has to load the state and train, so a round it is expected in waits the longest wait, on every member.
2. ``same_reference``: members announce the fingerprint of the reference they trained from; frames from another
   reference cannot be reduced together. If another reference is held by more members, ours is the diverged one
   and the caller fetches the state. Every member applies the same rule to the same announcements, so a diverged
   replica is left out by the others exactly when it leaves itself out.
3. ``choose_outcome``: a committed outcome published by a member with our reference *is* the round; the earliest
   published (ties: the publisher's name) wins, so every reader of the same records picks the same one — also a
   peer that retries the round, arrives late or only observes.
4. ``late_senders`` + ``take_late``: a sender in another member's group but not in ours (it announced after we
   closed, or its join record reached that member first) is taken in, unless its reference is not ours; without
   this one early close would drop it for everyone.
5. ``agree_step``: stop waiting once every member published a have-list over the whole group (a list over a
   smaller group may lack a late sender it has not tried yet), or when the agree wait ran out.
6. ``agreed_set``: the round's frames are (what I hold) ∩ (every have-list received), restricted to the members that
   published one: a frame any member tried and failed to get is dropped by everyone who reads that list. Fewer than
   ``min_members`` frames do not commit: a peer cut off from the others must not go on alone.
7. ``settle_step``: after publishing, wait for the outcomes of every member of the group (not only those we agreed
   with: one whose list we missed may have read ours and published a larger outcome first); members whose have-list
   reads raced at the agree deadline find out here, and ``choose_outcome`` makes them apply the same set — an
   earlier outcome still pending for us (its lists not visible yet) leaves the round undecided rather than let us
   take a later one that the others do not.
8. ``adopt_sources``: commit exactly the outcome's frames, fetched from their senders or from any publisher of the
   same outcome (each holds every frame in it).
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, NamedTuple

Pair = tuple[str, str]  # (sender, sha256 hex): frames are named by digest, never by sender alone (dht_frames.py)


# -- records ------------------------------------------------------------------------------------------------
class Announcement(NamedTuple):
    """"I submitted this frame for round r, computed from this reference", as ``DhtTransport.submit`` stores it."""

    peer_id: str
    size: int
    sha256: str
    fingerprint: str

    @classmethod
    def parse(cls, value: Any) -> "Announcement | None":
        if not (isinstance(value, (list, tuple)) and len(value) == 4 and isinstance(value[0], str)
                and isinstance(value[1], int) and all(isinstance(x, str) for x in value[2:])):
            return None
        if not (0 < value[1] <= MAX_FRAME and _is_sha(value[2]) and len(value[3]) <= 64 and len(value[0]) <= 128):
            return None
        return cls(*value)


MAX_FRAME = 4 << 30  # the largest frame an announcement may name (as dht_frames.MAX_FRAME)


def _is_sha(text: Any) -> bool:
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def parse_pairs(value: Any) -> frozenset[Pair] | None:
    """A have-list's or an outcome's frames as stored (a list of [sender, sha256]); None when malformed."""
    if not isinstance(value, (list, tuple)):
        return None
    pairs = set()
    for item in value:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            return None
        pairs.add((item[0], item[1]))
    return frozenset(pairs)


def encode_pairs(pairs: Iterable[Pair]) -> list[list[str]]:
    return sorted([s, sha] for s, sha in pairs)


@dataclass(frozen=True)
class HaveList:
    """A member's have-list: the frames it fetched and verified (``held``) out of those of ``group``, the senders
    it took into the round. ``group`` tells the others whether a missing frame was tried and failed (a drop) or
    belongs to a sender this member has not heard of yet (it will learn of it from their lists and try)."""

    held: frozenset[Pair]
    group: frozenset[str]

    def encode(self) -> list[Any]:
        return [encode_pairs(self.held), sorted(self.group)]

    @classmethod
    def parse(cls, value: Any) -> "HaveList | None":
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[1], (list, tuple))
                and all(isinstance(n, str) for n in value[1])):
            return None
        held = parse_pairs(value[0])
        return None if held is None else cls(held, frozenset(value[1]))


@dataclass(frozen=True)
class Outcome:
    """A peer's record of how a round ended: ``committed`` with exactly ``pairs``, from reference ``fingerprint``.
    ``sources``: publisher → peer id of every peer that published this same outcome (each holds its frames)."""

    publisher: str
    peer_id: str
    fingerprint: str
    published_at: float
    committed: bool
    pairs: frozenset[Pair]
    confirmed: frozenset[str] = frozenset()  # the members whose have-lists gave ``pairs`` (dht_quorum checks it)
    sources: Mapping[str, str] = field(default_factory=dict)

    def encode(self) -> list[Any]:
        return [self.peer_id, self.fingerprint, self.published_at, self.committed, encode_pairs(self.pairs),
                sorted(self.confirmed)]

    @classmethod
    def parse(cls, publisher: str, value: Any) -> "Outcome | None":
        if not (isinstance(value, (list, tuple)) and len(value) == 6 and isinstance(value[5], (list, tuple))
                and all(isinstance(n, str) for n in value[5])):
            return None
        peer_id, fingerprint, published_at, committed, raw, confirmed = value
        pairs = parse_pairs(raw)
        if not (isinstance(peer_id, str) and isinstance(fingerprint, str) and isinstance(published_at, (int, float))
                and isinstance(committed, bool) and pairs is not None):
            return None
        return cls(publisher, peer_id, fingerprint, float(published_at), committed, pairs, frozenset(confirmed),
                   {publisher: peer_id})


def live_members(heartbeats: Mapping[str, Any], round_: int | None = None) -> set[str]:
    """Peers with a live heartbeat (that take part in ``round_``, if given: a joiner is not waited for before the
    round it fetched the state of). A leave record (status "left") and a joiner still fetching the state
    ("joining") are not live."""
    live = set()
    for name, v in heartbeats.items():
        if isinstance(v, (list, tuple)) and len(v) >= 3 and v[1] == "live" and isinstance(v[2], int):
            if round_ is None or v[2] <= round_:
                live.add(name)
    return live


def parse_haves(records: Mapping[str, Any], group: Iterable[str]) -> dict[str, HaveList]:
    """The well-formed have-lists of the members of ``group``."""
    members = set(group)
    haves = {s: HaveList.parse(v) for s, v in records.items() if s in members}
    return {s: h for s, h in haves.items() if h is not None}


# -- 1. closing the group -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CloseView:
    """What a closing peer has seen so far: the last announcements and heartbeats read successfully (None: never),
    when it first saw an announcement and when the group last grew (the spread the adaptive wait learns from)."""

    announced: Mapping[str, Any] = field(default_factory=dict)
    heartbeats: Mapping[str, Any] | None = None
    first_seen: float | None = None
    last_new: float = 0.0
    most: int = 0  # the most announcements seen in one read

    def see(self, now: float, announced: Mapping[str, Any] | None,
            heartbeats: Mapping[str, Any] | None) -> "CloseView":
        """This view after one poll's reads (None: that read failed, and the last view stands)."""
        seen = self.announced if announced is None else announced
        grew = len(seen) > self.most
        return CloseView(seen, self.heartbeats if heartbeats is None else heartbeats,
                         self.first_seen if self.first_seen is not None or not seen else now,
                         now if grew else self.last_new, max(self.most, len(seen)))

    def live(self, round_: int) -> set[str] | None:
        """The peers taking part in ``round_`` by their heartbeats; None while no heartbeat read succeeded."""
        return None if self.heartbeats is None else live_members(self.heartbeats, round_)

    @property
    def spread(self) -> float:
        """First to last announcement (what ``node.membership.round_wait`` adapts to)."""
        return 0.0 if self.first_seen is None else self.last_new - self.first_seen


class GroupKind(str, enum.Enum):
    ALL_ANNOUNCED = "all_announced"  # closed: every expected peer announced
    WAIT_OVER = "wait_over"  # closed: the round's wait after the first announcement ran out
    DEADLINE = "deadline"  # closed: the caller's bound ran out (the group may be empty)
    NO_ANNOUNCEMENT = "no_announcement"  # open: nobody announced yet
    LIVE_UNKNOWN = "live_unknown"  # open: no heartbeat read succeeded yet, so nobody knows who is live
    QUORUM_WAIT = "quorum_wait"  # open: fewer than min_nodes announced (a round below quorum cannot commit)
    WAITING = "waiting"  # open: expected peers have not announced and the wait is not over


@dataclass(frozen=True)
class GroupDecision:
    close: bool
    kind: GroupKind
    reason: str
    missing: tuple[str, ...] = ()  # expected peers that had not announced
    group: tuple[str, ...] = ()  # who had announced (the group, once closed)


def round_joiners(round_: int, given: Iterable[str], wants: Mapping[str, int]) -> set[str]:
    """Joiners expected in ``round_``: those this peer gave the state of this round, and those downloading it (from
    us or another donor) now."""
    return set(given) | {name for name, target in wants.items() if target == round_}


def close_wait(wait: float, why: str, longest: float, joiners: Iterable[str]) -> tuple[float, str]:
    """The round's wait: ``wait`` (fixed or adaptive), or the longest wait when joiners are expected — they still
    load the state and train their first steps (one slower round per join, on every member alike)."""
    names = sorted(joiners)
    if names and longest > wait:
        return longest, f"the longest wait: {', '.join(names)} fetched the state"
    return wait, why


def close_group(now: float, first_seen: float | None, announced: Iterable[str], live: set[str] | None,
                joiners: Iterable[str], wait: float, deadline: float, why: str = "",
                min_members: int = 1) -> GroupDecision:
    """Whether to close the round now. ``live``: the peers whose heartbeat says they take part (None: unknown,
    every heartbeat read failed); ``wait``: seconds after ``first_seen`` (``why``: how it was chosen);
    ``deadline``: the caller's bound, absolute. With fewer than ``min_members`` announcements the round stays
    open until the deadline, as a coordinator keeps it: closing it could only fail, and a lone peer would retry as
    fast as it trains, while a member that restarts or joins is exactly what it waits for."""
    got = tuple(sorted(set(announced)))
    known = live is not None
    expected = (live or set()) | set(joiners)
    missing = tuple(sorted(expected - set(got)))
    short = len(got) < min_members

    def decide(close: bool, kind: GroupKind, reason: str) -> GroupDecision:
        return GroupDecision(close, kind, reason, missing, got)

    if got and known and not missing and not short:
        return decide(True, GroupKind.ALL_ANNOUNCED, f"all {len(expected)} expected peers announced")
    without = ", ".join(missing) or ("nobody" if known else "peers unknown (no heartbeat read succeeded)")
    if first_seen is not None and now >= first_seen + wait and not short:
        return decide(True, GroupKind.WAIT_OVER,
                      f"closing without {without} after the round's wait ({why or f'{wait:.1f} s'})")
    if now >= deadline:
        return decide(True, GroupKind.DEADLINE, f"closing without {without} at the caller's deadline")
    if not got:
        return decide(False, GroupKind.NO_ANNOUNCEMENT, "no announcement yet")
    if short:
        return decide(False, GroupKind.QUORUM_WAIT, f"waiting for a quorum: {len(got)} announced, min_nodes is "
                      f"{min_members}")
    if not known:
        return decide(False, GroupKind.LIVE_UNKNOWN,
                      f"no heartbeat read succeeded: not closing early on {len(got)} announcement(s)")
    return decide(False, GroupKind.WAITING, f"waiting for {', '.join(missing)}")


# -- 2. the reference ---------------------------------------------------------------------------------------
class ReferenceKind(str, enum.Enum):
    UNCHECKED = "unchecked"  # we hold no fingerprint, or every announced one is ours or empty
    FILTERED = "filtered"  # ours is the most common: members with another reference are left out
    DIVERGED = "diverged"  # another reference is held by more members: we fetch the state


@dataclass(frozen=True)
class ReferenceDecision:
    kind: ReferenceKind
    reason: str
    members: Mapping[str, Announcement]  # the announcements that stay in the group (empty when diverged)
    dropped: tuple[tuple[str, str], ...] = ()  # (sender, why) of the members left out


def same_reference(mine: str, announced: Mapping[str, Announcement]) -> ReferenceDecision:
    """Keep the members whose announced reference is ours (``mine``; "" = not checked, on either side). Ties between
    the most common references go to the larger fingerprint string, the same for every reader."""
    groups: dict[str, set[str]] = {}
    for sender, a in announced.items():
        groups.setdefault(a.fingerprint, set()).add(sender)
    if not mine or set(groups) <= {mine, ""}:
        return ReferenceDecision(ReferenceKind.UNCHECKED, "every member holds our reference", dict(announced))
    checked = {fp: members for fp, members in groups.items() if fp}
    best = max(checked.items(), key=lambda kv: (len(kv[1]), kv[0]))[0]
    if best != mine:
        return ReferenceDecision(ReferenceKind.DIVERGED, f"this replica's reference {mine} differs from the run's "
                                 f"{best} (held by {len(checked[best])} members): fetching the state", {})
    keep = {s: a for s, a in announced.items() if a.fingerprint in (mine, "")}
    dropped = tuple((s, f"its reference {announced[s].fingerprint} differs from ours {mine} (a diverged replica)")
                    for s in sorted(set(announced) - set(keep)))
    return ReferenceDecision(ReferenceKind.FILTERED, f"left out {len(dropped)} member(s) with another reference",
                             keep, dropped)


# -- 3. a decided round -------------------------------------------------------------------------------------
def choose_outcome(records: Mapping[str, Any], mine: str, pending: Mapping[str, Any] | None = None) -> Outcome | None:
    """The round's outcome among the ``done`` records: the earliest published committed one from our reference
    (ties: the publisher's name), with every publisher of the same frames as a source. None: undecided.
    ``pending``: committed outcomes not supported *yet* (a confirming member's have-list is not visible to this
    reader). One published earlier than the best supported one leaves the round undecided: another reader that
    sees those lists takes it, so taking the later one here would apply another member set for the same round (a
    replica split). Undecided, the round is read again (it is retried) until that outcome is supported or gone."""
    def ours(values: Mapping[str, Any]) -> list[Outcome]:
        found = [Outcome.parse(p, v) for p, v in values.items()]
        return [o for o in found if o is not None and o.committed and (not mine or o.fingerprint in (mine, ""))]

    good = ours(records)
    if not good:
        return None
    best = min(good, key=lambda o: (o.published_at, o.publisher))
    if any((o.published_at, o.publisher) < (best.published_at, best.publisher) for o in ours(pending or {})):
        return None
    return dataclasses.replace(best, sources={o.publisher: o.peer_id for o in good if o.pairs == best.pairs})


# -- 4. late senders ----------------------------------------------------------------------------------------
def late_senders(haves: Mapping[str, HaveList], group: Iterable[str], refused: Iterable[str]) -> set[str]:
    """Senders in some member's group but not in ours, and not already refused."""
    listed: set[str] = set().union(*(h.group for h in haves.values()))
    return listed - set(group) - set(refused)


class LateKind(str, enum.Enum):
    TAKEN = "taken"  # its announcement is readable and from our reference: it joins our group
    OTHER_REFERENCE = "other_reference"  # refused for good: its frame cannot be reduced with ours
    NOT_READABLE = "not_readable"  # no well-formed announcement read yet: asked again at the next poll


@dataclass(frozen=True)
class LateDecision:
    verdicts: Mapping[str, LateKind]
    taken: Mapping[str, Announcement]
    reason: str

    @property
    def refused(self) -> set[str]:
        return {s for s, k in self.verdicts.items() if k is LateKind.OTHER_REFERENCE}


def take_late(late: Iterable[str], seen: Mapping[str, Any], mine: str) -> LateDecision:
    """Which late senders to take into the round, given the announcements read now (``seen``)."""
    verdicts: dict[str, LateKind] = {}
    taken: dict[str, Announcement] = {}
    for sender in sorted(late):
        a = Announcement.parse(seen.get(sender))
        if a is None:
            verdicts[sender] = LateKind.NOT_READABLE
        elif mine and a.fingerprint not in (mine, ""):
            verdicts[sender] = LateKind.OTHER_REFERENCE
        else:
            verdicts[sender], taken[sender] = LateKind.TAKEN, a
    parts = [f"{k.value}: {', '.join(s for s, v in verdicts.items() if v is k)}" for k in LateKind
             if any(v is k for v in verdicts.values())]
    return LateDecision(verdicts, taken, "; ".join(parts) or "no late sender")


# -- 5. waiting for the have-lists --------------------------------------------------------------------------
class AgreeKind(str, enum.Enum):
    ALL_LISTED = "all_listed"  # every member listed what it holds of the whole group
    TIMED_OUT = "timed_out"  # the agree wait ran out
    LATE_PENDING = "late_pending"  # waiting: a sender another member took in is not in our group yet
    LISTS_MISSING = "lists_missing"  # waiting: members without a have-list over the whole group
    OBSERVING = "observing"  # waiting (not a member): for a member's outcome


@dataclass(frozen=True)
class AgreeStep:
    done: bool
    kind: AgreeKind
    reason: str


def agree_step(now: float, until: float, haves: Mapping[str, HaveList], group: Iterable[str],
               refused: Iterable[str], member: bool = True) -> AgreeStep:
    """Whether to stop waiting for have-lists. ``haves`` includes our own (members); ``until``: the agree wait's
    end. An observer waits for an outcome only, until ``until``."""
    members = set(group)
    if member:
        pending = late_senders(haves, members, refused)
        short = sorted(s for s in members if s not in haves or not haves[s].group >= members)
        if not pending and not short:
            return AgreeStep(True, AgreeKind.ALL_LISTED, f"all {len(members)} members listed what they hold")
    if now >= until:
        return AgreeStep(True, AgreeKind.TIMED_OUT, "the agree wait ran out")
    if not member:
        return AgreeStep(False, AgreeKind.OBSERVING, "waiting for a member's outcome")
    if pending:
        return AgreeStep(False, AgreeKind.LATE_PENDING, f"waiting to take in {', '.join(sorted(pending))}")
    return AgreeStep(False, AgreeKind.LISTS_MISSING, f"waiting for the have-lists of {', '.join(short)}")


# -- 6. the agreed set --------------------------------------------------------------------------------------
class Verdict(str, enum.Enum):
    COMMIT = "commit"
    NO_COMMON_FRAME = "no_common_frame"  # no frame is held by every member that published a list
    NO_QUORUM = "no_quorum"  # fewer agreed frames than the run's min_nodes


@dataclass(frozen=True)
class AgreeDecision:
    kind: Verdict
    reason: str
    pairs: frozenset[Pair]  # the round's frames (empty unless COMMIT)
    confirmed: frozenset[str]  # members that published a have-list in time
    dropped: tuple[tuple[str, str], ...] = ()  # (sender, why) of frames we hold that did not make it
    group: frozenset[str] = frozenset()  # the round's members (every sender taken into it)

    @property
    def settle_with(self) -> frozenset[str]:
        """The members whose outcomes the settle wait is for: every member of the group — not only those we agreed
        with. A member whose have-list we did not read in time may have read ours and published a larger outcome
        earlier than ours; that one is the round's (``choose_outcome``), so we wait to see it."""
        return self.confirmed | {s for s, _ in self.pairs} | self.group


def agreed_set(held: Iterable[Pair], haves: Mapping[str, HaveList], members: Iterable[str],
               min_members: int, voters: int = 0) -> AgreeDecision:
    """(what I hold) ∩ (every have-list of a member of the group), restricted to the senders that published one.
    ``voters``: the members whose lists a quorum is counted from (more than half must have listed; 0: no check)."""
    group = set(members)
    confirmed = frozenset(s for s in haves if s in group)
    if len(confirmed) < voters // 2 + 1 and voters:
        return AgreeDecision(Verdict.NO_QUORUM, f"only {len(confirmed)} of {voters} members listed what they hold "
                             "in time: a quorum is more than half", frozenset(), confirmed, (), frozenset(group))
    mine = set(held)
    final = {p for p in mine if p[0] in confirmed}
    for sender in confirmed:
        final &= haves[sender].held
    kept = {s for s, _ in final}
    dropped = tuple((s, "published no have-list in time" if s not in confirmed else "another member does not hold it")
                    for s in sorted({s for s, _ in mine} - kept))
    if not final:
        return AgreeDecision(Verdict.NO_COMMON_FRAME, "no frame is held by every member", frozenset(), confirmed,
                             dropped, frozenset(group))
    if len(final) < min_members:
        return AgreeDecision(Verdict.NO_QUORUM, f"only {len(final)} member(s) agreed, fewer than the run's min_nodes "
                             f"{min_members}", frozenset(), confirmed, dropped, frozenset(group))
    return AgreeDecision(Verdict.COMMIT, f"{len(final)} frame(s) held by all {len(confirmed)} listing member(s)",
                         frozenset(final), confirmed, dropped, frozenset(group))


# -- 7. settling --------------------------------------------------------------------------------------------
class SettleKind(str, enum.Enum):
    ALL_PUBLISHED = "all_published"  # every member we agreed with published an outcome
    TIMED_OUT = "timed_out"  # the settle wait ran out
    WAITING = "waiting"


@dataclass(frozen=True)
class SettleStep:
    done: bool
    kind: SettleKind
    reason: str


def settle_step(now: float, until: float, published: Iterable[str], peers: Iterable[str], me: str) -> SettleStep:
    """Whether to stop waiting for the other members' outcomes (``published``: who has a done record)."""
    missing = sorted(set(peers) - {me} - set(published))
    if not missing:
        return SettleStep(True, SettleKind.ALL_PUBLISHED, "every member we agreed with published its outcome")
    if now >= until:
        return SettleStep(True, SettleKind.TIMED_OUT, f"no outcome from {', '.join(missing)} within the settle wait")
    return SettleStep(False, SettleKind.WAITING, f"waiting for the outcomes of {', '.join(missing)}")


# -- 8. adopting --------------------------------------------------------------------------------------------
def adopt_sources(outcome: Outcome,
                  announced: Mapping[str, Announcement]) -> dict[str, tuple[list[str], int | None, str]]:
    """sender → (peer ids to fetch its frame from, size (unknown: None), sha256) for every frame of ``outcome``: its
    sender first when it announced exactly that frame, then every publisher of the outcome, then every member whose
    have-list gave the outcome (``confirmed``: each listed, so holds and serves, every frame of it) — a sender and the
    outcome's only publisher that die together must not leave a frame that other members hold unreachable."""
    wanted: dict[str, tuple[list[str], int | None, str]] = {}
    holders = [announced[m].peer_id for m in sorted(outcome.confirmed) if m in announced]
    for sender, sha in sorted(outcome.pairs):
        a = announced.get(sender)
        direct = [a.peer_id] if a is not None and a.sha256 == sha else []
        wanted[sender] = (list(dict.fromkeys(direct + list(outcome.sources.values()) + holders)), None, sha)
    return wanted


def commit_reason(announced: Iterable[str], committed: Iterable[str]) -> str:
    missing = sorted(set(announced) - set(committed))
    return "every announced member agreed" if not missing else f"committed without {', '.join(missing)}"
