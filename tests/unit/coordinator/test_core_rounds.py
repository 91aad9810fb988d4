"""CoordinatorCore with a fake clock: committed rounds, collect, submissions and uploads (chunking, resume,
bad payloads). Harness: core_harness.py; fixtures ``clock``, ``make``, ``h``: conftest.py."""
from __future__ import annotations

import re

import pytest
import torch

from core_harness import Clock, Harness
from coordinator.core import Chunk
from coordinator.errors import (BadPayload, BadSignature, Conflict, NotSubmitted, ResultGone, ResumeMismatch, StillOpen,
                                TooLarge, Truncated, UnknownNode, WrongRound)
from coordinator.uploads import RESUME_KEY
from node.transport.messages import RoundResult, RoundStatus


# -- a committed round -------------------------------------------------------------------------------
def test_two_members_commit_and_replicas_match_the_reference(h: Harness, clock: Clock) -> None:
    ja, jb = h.join("a"), h.join("b")
    workers = {"a": h.worker("a", ja), "b": h.worker("b", jb)}
    fp0 = h.core.reference.fingerprint()
    assert all(w.fingerprint() == fp0 for w in workers.values())
    sent_by_a, losses = 0, []
    for r in range(2):
        frames = {}
        for name, w in workers.items():
            stats = w.train()
            frames[name] = w.prepare(r)
            losses.append(stats.mean_loss)
            assert h.submit(name, r, frames[name], loss=stats.mean_loss) \
                == {"round": r, "received_bytes": len(frames[name]), "accepted": True}
            clock.advance(0.5)
        sent_by_a += len(frames["a"])
        assert h.core.open_round == r + 1 and h.core.reference.committed_rounds == r + 1
        result, to_send = h.core.collect(h.ids["a"], r, 0.0, True)
        assert to_send == ["b"]
        assert list(result.frames) == ["a", "b"] and result.frames == frames
        assert result.round == r and result.reason == "all 2 live members submitted"
        _, to_send_b = h.core.collect(h.ids["b"], r, 0.0, True)
        assert to_send_b == ["a"]
        for w in workers.values():
            report = w.apply(RoundResult(r, RoundStatus.COMMITTED, result.frames))
            assert report.committed and report.contributed and report.rejected == {}
        assert result.fingerprint == h.core.reference.fingerprint() != fp0
        assert all(w.fingerprint() == result.fingerprint for w in workers.values())
    assert h.store.last_round() == 1
    rows = h.store.recent_rounds()
    assert [r.round for r in rows] == [0, 1] and rows[-1].members == ["a", "b"]
    assert rows[-1].fingerprint == h.core.reference.fingerprint()
    assert rows[-1].mean_loss == pytest.approx(sum(losses[2:]) / 2, rel=1e-6)
    assert rows[-1].bytes_in == sum(len(f) for f in frames.values())
    assert rows[-1].bytes_out == len(frames["a"]) + len(frames["b"])  # each member gets the other's frame
    m = h.core.members[h.ids["a"]]
    assert m.rounds_contributed == 2 and m.bytes_in == sent_by_a
    assert m.last_loss == pytest.approx(losses[2], rel=1e-6)
    # the spread of a fully-attended round feeds the next deadline
    assert list(h.core.spreads) == [0.5, 0.5]


def test_collect_open_round_with_no_wait_is_still_open(h: Harness) -> None:
    h.join("a"), h.join("b")
    h.submit("a", 0)
    with pytest.raises(StillOpen, match=re.escape("round 0 is still open: waiting for 1 of 2 members")) as info:
        h.core.collect(h.ids["a"], 0, 0.0, True)
    assert info.value.code == "DEADLINE_EXCEEDED"
    # a member that did not submit may also wait for the round, when it says so
    with pytest.raises(StillOpen):
        h.core.collect(h.ids["b"], 0, 0.0, False)


def test_collect_by_member_without_payload_is_not_submitted(h: Harness) -> None:
    h.join("a"), h.join("b")
    h.submit("a", 0)
    with pytest.raises(NotSubmitted, match="no payload from b for round 0 is held") as info:
        h.core.collect(h.ids["b"], 0, 0.0, True)
    assert info.value.metadata == {"lowband-not-submitted": "1"}
    assert info.value.code == "ABORTED"


def test_collect_round_not_open_yet(h: Harness) -> None:
    h.join("a")
    with pytest.raises(ResultGone, match=re.escape("round 1 is not open yet (the open round is 0)")) as info:
        h.core.collect(h.ids["a"], 1, 0.0, False)
    assert info.value.code == "FAILED_PRECONDITION"  # as for a result no longer held: fetch the state


def test_submit_for_closed_or_future_round_is_wrong_round(h: Harness) -> None:
    h.join("a"), h.join("b")
    h.submit("a", 0), h.submit("b", 0)
    assert h.core.open_round == 1
    with pytest.raises(WrongRound, match=re.escape("round 0 is closed (the open round is 1)")) as info:
        h.submit("a", 0)
    assert info.value.code == "FAILED_PRECONDITION"
    with pytest.raises(WrongRound, match=re.escape("round 2 is not open yet (the open round is 1)")):
        h.submit("a", 2)


def test_joiner_cannot_submit_before_its_first_round(h: Harness) -> None:
    h.join("a"), h.join("b")
    h.submit("a", 0)
    assert h.join("late")["first_round"] == 1
    with pytest.raises(WrongRound, match="late joined for round 1; it cannot contribute to round 0"):
        h.submit("late", 0)
    h.submit("b", 0)  # "late" is not expected for round 0: the round closes without it
    assert h.core.open_round == 1
    h.submit("late", 1)
    assert h.core.status()["submitted"] == ["late"]


def test_unknown_node_everywhere(h: Harness) -> None:
    h.join("a")
    ghost = "f" * 32
    pattern = "unknown node id ffffffff…: never joined, left, or its lease expired; join again"
    for call in (lambda: h.core.submit(iter([Chunk(ghost, 0, 0, 100, b"x" * 100)])),
                 lambda: h.core.heartbeat(ghost),
                 lambda: h.core.collect(ghost, 0, 0.0, False),
                 lambda: h.core.leave(ghost, "bye"),
                 lambda: list(h.core.fetch_state(ghost, 0))):
        with pytest.raises(UnknownNode, match=re.escape(pattern)) as info:
            call()
        assert info.value.code == "NOT_FOUND"


# -- uploads -----------------------------------------------------------------------------------------
def test_oversized_and_empty_uploads(h: Harness) -> None:
    h.join("a")
    limit = h.core.limit
    with pytest.raises(TooLarge, match=f"payload of {limit + 1} bytes exceeds this run's limit of {limit} bytes") as info:
        h.core.submit(iter([Chunk(h.ids["a"], 0, 0, limit + 1, b"x")]))
    assert info.value.code == "INVALID_ARGUMENT"  # larger than any honest frame: malformed, not a passing quota
    with pytest.raises(BadPayload, match="total_size is 0: an upload must carry a payload"):
        h.core.submit(iter([Chunk(h.ids["a"], 0, 0, 0, b"")]))
    with pytest.raises(BadPayload, match="empty upload stream: send at least one chunk"):
        h.core.submit(iter([]))
    assert h.core.uploads == {} and h.core.submitted == {}


def test_upload_in_several_chunks(h: Harness) -> None:
    h.join("a"), h.join("b")
    frame = h.frame("a", 0)
    assert h.submit("a", 0, frame, piece=4096)["accepted"]
    assert h.core.submitted[h.ids["a"]][0] == frame


def test_truncated_upload_then_resume_completes(h: Harness) -> None:
    h.join("a"), h.join("b")
    frame = h.frame("a", 0)
    head = h.chunks("a", 0, frame[:1000], total=len(frame), piece=300)
    with pytest.raises(Truncated, match=f"stream ended at byte 1000 of {len(frame)}; resume from offset 1000") as info:
        h.core.submit(iter(head))
    assert info.value.metadata == {RESUME_KEY: "1000"}
    assert info.value.code == "DATA_LOSS"
    # an upload in progress counts as submitted for collect (it is not "lost")
    with pytest.raises(StillOpen):
        h.core.collect(h.ids["a"], 0, 0.0, True)
    assert h.submit("a", 0, frame[1000:], offset=1000, total=len(frame)) == \
        {"round": 0, "received_bytes": len(frame), "accepted": True}
    assert h.core.submitted[h.ids["a"]][0] == frame
    h.submit("b", 0)
    result, _ = h.core.collect(h.ids["b"], 0, 0.0, True)
    assert result.frames["a"] == frame


def test_resume_at_wrong_offset_names_the_right_one(h: Harness) -> None:
    h.join("a"), h.join("b")
    frame = h.frame("a", 0)
    with pytest.raises(Truncated):
        h.core.submit(iter(h.chunks("a", 0, frame[:1000], total=len(frame))))
    with pytest.raises(ResumeMismatch, match="chunk offset 1500 but 1000 bytes are held; resume from 1000") as info:
        h.submit("a", 0, frame[1500:], offset=1500, total=len(frame))
    assert info.value.metadata == {RESUME_KEY: "1000"}
    assert info.value.code == "OUT_OF_RANGE"
    # a resume with no upload in progress must start from 0
    with pytest.raises(ResumeMismatch) as info:
        h.submit("b", 0, b"y" * 10, offset=10, total=20)
    assert info.value.metadata == {RESUME_KEY: "0"}
    # the held bytes survive the mismatch: resuming at 1000 completes the upload
    assert h.submit("a", 0, frame[1000:], offset=1000, total=len(frame))["accepted"]


def test_restart_of_an_upload_from_zero_replaces_the_partial_one(h: Harness) -> None:
    h.join("a"), h.join("b")
    with pytest.raises(Truncated):
        h.core.submit(iter(h.chunks("a", 0, b"junk" * 10, total=5000)))
    frame = h.frame("a", 0)
    assert h.submit("a", 0, frame)["accepted"]


def test_chunks_that_do_not_continue_the_upload(h: Harness) -> None:
    h.join("a")
    nid = h.ids["a"]
    with pytest.raises(BadPayload, match=re.escape("chunk for node/round/total (0, 999) differs from the upload's "
                                                   "first chunk (0, 1000)")):
        h.core.submit(iter([Chunk(nid, 0, 0, 1000, b"x" * 10), Chunk(nid, 0, 10, 999, b"x" * 10)]))
    with pytest.raises(BadPayload, match="chunks carry more than the declared total_size 20"):
        h.core.submit(iter([Chunk(nid, 0, 0, 20, b"x" * 15), Chunk(nid, 0, 15, 20, b"x" * 15)]))


@pytest.mark.parametrize("case, pattern", [
    ("garbage", r"payload rejected: payload does not start with the lowband magic b'LBW1'"),
    ("corrupt", r"payload rejected: payload digest mismatch \(truncated or corrupted in transit\)"),
    # signed frames (docs/algorithms.md §11): the signature says precisely what is wrong before anything is decoded
    ("wrong_round", r"payload rejected: frame signed by 'a' for round 1 replayed in round 0"),
    ("wrong_run", r"payload rejected: frame signed by 'a' for run 'other-run' replayed in run 'core-test'"),
    ("other_sender", r"payload rejected: frame signed by 'b' \(key id [0-9a-f]{16}\) arrived as 'a''s \(a swapped "
                     r"sender\)"),
])
def test_bad_payloads_are_rejected_and_the_member_can_still_submit(h: Harness, case: str, pattern: str) -> None:
    h.join("a"), h.join("b")
    good = h.frame("a", 0)
    bad = {"garbage": bytes(torch.randint(0, 256, (2000,), generator=h.gen, dtype=torch.uint8).tolist()),
           "corrupt": good[:100] + bytes([good[100] ^ 0xFF]) + good[101:],
           "wrong_round": h.frame("a", 1),
           "wrong_run": h.frame("a", 0, run="other-run"),
           "other_sender": h.frame("b", 0)}[case]
    with pytest.raises(BadPayload, match=pattern) as info:
        h.submit("a", 0, bad)
    assert info.value.code == "INVALID_ARGUMENT"
    assert isinstance(info.value, BadSignature) == (case in ("wrong_round", "wrong_run", "other_sender"))  # metrics
    assert h.core.submitted == {} and h.core.uploads == {} and h.core.deadline is None
    with pytest.raises(NotSubmitted):
        h.core.collect(h.ids["a"], 0, 0.0, True)
    h.submit("a", 0, good)
    h.submit("b", 0)
    assert h.core.open_round == 1
    result, _ = h.core.collect(h.ids["a"], 0, 0.0, True)
    assert result.frames["a"] == good


def test_resubmitting_the_same_payload_is_idempotent_a_different_one_conflicts(h: Harness) -> None:
    h.join("a"), h.join("b")
    frame = h.frame("a", 0)
    assert h.submit("a", 0, frame)["accepted"]
    assert h.submit("a", 0, frame) == {"round": 0, "received_bytes": len(frame), "accepted": True}
    with pytest.raises(Conflict, match="a different payload for round 0 was already accepted"):
        h.submit("a", 0, frame + b"x")
    same_size = bytearray(frame)
    same_size[len(frame) // 2] ^= 0xFF
    with pytest.raises(Conflict, match="a different payload for round 0 was already accepted"):
        h.submit("a", 0, bytes(same_size))
    assert h.core.open_round == 0 and h.core.submitted[h.ids["a"]][0] == frame
