"""Adversarial review (adv-models), fixed: the robust state kept a ``MemberRecord`` for every *name* that ever sent a
frame, for good, while its reader refuses more than ``MAX_MEMBERS`` records (and a state file's header is bounded).
A member with the join token that rejoins under fresh names (docs/security.md, "Known limits") grew it round by
round until the coordinator wrote a state that neither it (restart) nor any joiner could load.

Now ``RobustState.pruned`` bounds the records after every round, alike on every replica (node/robust/state.py):
these tests check that what the writer produces loads back through the real state file, whatever came before, and
that pruning forgets only what does not matter."""
from __future__ import annotations

import dataclasses

import torch

from node.config import ReduceConfig
from node.robust.defaults import untrusted
from node.robust.state import (MAX_EVICTED, MAX_MEMBERS, MAX_RECORDS, RECORD_TTL_ROUNDS, MemberRecord, RobustState,
                               record_frame)
from robust_harness import reduce_round, reference, run_config

CFG = ReduceConfig(**untrusted("identity"))
HONEST = {"a": [3, 4], "b": [3, 4], "c": [3, 4]}


def _one(round_: int) -> MemberRecord:
    return record_frame(MemberRecord(), round_, False, False, False, 1.0, 0.9, CFG)


def _evicted(round_: int, seen: int | None = None) -> MemberRecord:
    return dataclasses.replace(_one(round_), evicted_at=round_, reason="4 of its last 4 frames were clipped",
                               last_round=round_ if seen is None else seen)


def _roundtrip(ref: object) -> RobustState:
    """The state as a joiner gets it: the reference's bytes, loaded by a fresh replica."""
    fresh = reference(ref.cfg)  # type: ignore[attr-defined]
    fresh.load_bytes(ref.to_bytes())  # type: ignore[attr-defined]
    assert fresh.robust is not None
    return fresh.robust


def test_the_state_written_after_many_one_frame_members_can_be_loaded_back() -> None:
    ref = reference(run_config(**untrusted("identity")))
    r = 2 * RECORD_TTL_ROUNDS
    # what the old writer left after a Sybil rejoined under a fresh name every round: more than the reader takes
    sybils = {f"sybil-{i:06d}": _one(r - 1 - i % RECORD_TTL_ROUNDS) for i in range(MAX_MEMBERS + 1)}
    ref.robust = RobustState(ref.robust.history, sybils)
    reduce_round(ref, HONEST, r)
    assert len(ref.robust.members) <= MAX_RECORDS
    assert {"a", "b", "c"} <= set(ref.robust.members)  # this round's senders are the last to be forgotten
    assert _roundtrip(ref).members == ref.robust.members


def test_the_largest_state_the_writer_keeps_fits_the_readers_header_bound() -> None:
    """``MAX_RECORDS`` evicted records under the longest names the frame format allows, in characters that JSON
    escapes into surrogate pairs, with the largest counts: ``Reference.max_header`` takes them."""
    ref = reference(run_config(**untrusted("identity")))
    big = dataclasses.replace(_evicted(1 << 52), frames=(1 << 64) - 1, clipped=(1 << 64) - 1, rejected=(1 << 64) - 1,
                              flags=(1 << 64) - 1, norm_ratio=-1.2345678901234567e-300, cosine=-0.12345678901234567,
                              reason="64 of its last 64 frames were clipped or rejected (reduce.evict_after 64 of 64)")
    names = [chr(0x10000 + i) + "\U0001F600" * 255 for i in range(MAX_RECORDS)]
    ref.robust = RobustState(ref.robust.history, {n: big for n in names})
    assert _roundtrip(ref).members == ref.robust.members


def test_a_quiet_member_is_forgotten_after_the_ttl_and_not_before() -> None:
    flagged = dataclasses.replace(_one(0), flags=0b111)  # 3 of 4: one more flagged frame evicts it
    state = RobustState((1.0,), {"quiet": flagged, "gone": _one(0)})
    assert state.pruned(RECORD_TTL_ROUNDS).members["quiet"] == flagged  # a pause does not wipe its flags
    assert state.pruned(RECORD_TTL_ROUNDS + 1).members == {}


def test_evictions_are_kept_over_live_records_and_the_most_recently_active_first() -> None:
    r = 10 * RECORD_TTL_ROUNDS
    evicted = {f"e{i:05d}": _evicted(i) for i in range(MAX_EVICTED + 10)}
    evicted["persistent"] = _evicted(0, seen=r)  # evicted at round 0 and still sending frames (dropped)
    live = {f"l{i:05d}": _one(r) for i in range(MAX_RECORDS)}
    state = RobustState((1.0,), {**live, **evicted}).pruned(r)
    kept = state.members
    assert len(kept) == MAX_RECORDS
    assert sum(rec.evicted for rec in kept.values()) == MAX_EVICTED  # old evictions beyond the cap go, oldest first
    assert "persistent" in kept and "e00010" not in kept and f"e{MAX_EVICTED + 9:05d}" in kept
    # every replica forgets the same ones, whatever order its dict holds them in
    shuffled = RobustState((1.0,), dict(reversed(list({**live, **evicted}.items())))).pruned(r)
    assert shuffled.header() == state.header()


def test_an_evicted_member_that_keeps_sending_is_remembered_as_seen() -> None:
    cfg = run_config(bound="clip", bound_ratio=2.0, evict_after=2, evict_window=3)
    ref = reference(cfg)
    for r in range(2):
        reduce_round(ref, {**HONEST, "d": [300, 400]}, r)
    assert ref.robust.members["d"].evicted_at == 1
    reduce_round(ref, {**HONEST, "d": [3, 4]}, 5)
    assert ref.robust.members["d"].last_round == 5 and ref.robust.members["d"].evicted_at == 1


def test_a_record_written_before_last_round_existed_loads_as_seen_in_the_states_last_round() -> None:
    old = {k: v for k, v in _one(3).to_json().items() if k != "last_round"}
    state = RobustState.from_state({"members": {"a": old}}, torch.tensor([1.0], dtype=torch.float64), 1, 40)
    assert state.members["a"].last_round == 39
