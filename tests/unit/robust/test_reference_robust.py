"""``Reference.reduce`` with a recipe's ``reduce`` on: bounds, robust modes, the accountability report, eviction and
the robust state in the state file — against hand-computed values; and ``reduce`` off is exactly the codec's reduce."""
from __future__ import annotations

import math

import pytest
import torch

from node.train.state_file import StateFormatError
from robust_harness import KEYS, RING, frame, reduce_round, reference, run_config


def test_clip_scales_the_outlier_in_the_aggregate_and_reports_it() -> None:
    ref = reference(run_config(bound="clip", bound_ratio=2.0))
    # norms 5, 10, 50 (exact in 12 bits): median 10, τ = 20 → c is scaled by 20 / 50 = 0.4 → [12, 16]
    agg = reduce_round(ref, {"a": [3, 4], "b": [6, 8], "c": [30, 40]}, apply=False)
    assert agg[0].tolist() == pytest.approx([(3 + 6 + 12) / 3, (4 + 8 + 16) / 3])
    report = agg.report
    assert report is not None and report.kept == ("a", "b", "c") and report.reference_norm == 10.0
    assert report.factors == {"a": (1.0,), "b": (1.0,), "c": (0.4,)}
    c = report.members["c"]
    assert (c.clipped, c.factor, c.norm_ratio, c.rejected) == (1, 0.4, 5.0, "")
    assert all(m.cosine == pytest.approx(1.0) for m in report.members.values())  # all along (3, 4)
    assert report.flagged == ["c"]
    assert report.to_json()["members"]["c"] == {"norm_ratio": 5.0, "cosine": 1.0, "clipped": 1, "factor": 0.4}


def test_reject_drops_the_frame_and_its_cosine_shows_which_way_it_pulled() -> None:
    ref = reference(run_config(bound="reject", bound_ratio=2.0))
    agg = reduce_round(ref, {"a": [3, 4], "b": [6, 8], "c": [-30, -40]}, apply=False)
    assert agg[0].tolist() == pytest.approx([4.5, 6.0])  # the mean of a and b
    assert agg.report.kept == ("a", "b") and "c" not in agg.report.factors
    assert "above reduce.bound_ratio 2" in agg.report.members["c"].rejected
    assert agg.report.members["c"].cosine == pytest.approx(-1.0)


@pytest.mark.parametrize("robust,expected", [("trimmed_mean", [3.0, -3.0]), ("median", [3.0, -3.0])])
def test_robust_modes_through_the_reference(robust: str, expected: list[float]) -> None:
    ref = reference(run_config(robust=robust, trim=0.25))
    payloads = {"a": [1, -1], "b": [2, -2], "c": [3, -3], "d": [4, -4], "e": [1000, -1000]}
    agg = reduce_round(ref, payloads, apply=False)  # trimmed: (2 + 3 + 4) / 3; median: 3
    assert agg[0].tolist() == expected
    assert agg.report.kept == tuple(payloads)  # no bound: nothing dropped, the mode does the work


def test_a_member_flagged_evict_after_times_is_evicted_and_its_frames_dropped_everywhere() -> None:
    cfg = run_config(bound="clip", bound_ratio=2.0, evict_after=2, evict_window=3)
    ref, replica = reference(cfg), reference(cfg)
    honest = {"a": [3, 4], "b": [3, 4], "c": [3, 4]}
    first = reduce_round(ref, {**honest, "d": [300, 400]}, 0)
    assert first.report.evicted == {}
    second = reduce_round(ref, {**honest, "d": [300, 400]}, 1)
    assert list(second.report.evicted) == ["d"]
    assert second.report.evicted["d"] == ("2 of its last 2 frames were clipped or rejected (reduce.evict_after 2 of "
                                          "3)")
    third = reduce_round(ref, {**honest, "d": [3, 4]}, 2)  # now well-behaved: dropped all the same
    assert third.report.kept == ("a", "b", "c")
    assert third.report.members["d"].rejected.startswith("evicted at round 1: 2 of its last 2 frames")
    record = ref.robust.members["d"]
    assert (record.frames, record.clipped, record.rejected, record.flags, record.evicted_at) == (2, 2, 0, 0b11, 1)
    # a replica that takes the state (a joiner) knows it too, and makes the same decisions
    replica.load_bytes(ref.to_bytes())
    assert replica.robust == ref.robust
    fourth = reduce_round(replica, {**honest, "d": [3, 4]}, 3, apply=False)
    assert fourth.report.kept == ("a", "b", "c")


def test_the_history_is_in_the_state_and_a_hostile_majority_cannot_move_the_bound_at_once() -> None:
    cfg = run_config(bound="reject", bound_ratio=2.0, history=0.5, history_ratio=4.0)
    ref = reference(cfg)
    reduce_round(ref, {"a": [3, 4], "b": [3, 4], "c": [3, 4]}, 0)  # reference 5 → history 5
    assert ref.robust.history == (5.0,)
    # everyone at norm 500: median 500, capped at 4 × 5 = 20, τ = 40: every frame rejected, the aggregate is 0
    agg = reduce_round(ref, {"a": [300, 400], "b": [300, 400], "c": [300, 400]}, 1)
    assert agg.report.kept == () and agg[0].tolist() == [0.0, 0.0]
    assert ref.robust.history == (0.5 * 5 + 0.5 * 20,)
    header_ok = reference(cfg)
    header_ok.load_bytes(ref.to_bytes())
    assert header_ok.robust.history == (12.5,)


def test_reduce_off_is_the_codecs_reduce_and_keeps_no_state() -> None:
    ref = reference(run_config())
    assert ref.robust is None and "reduce" not in ref.cfg.to_dict()["recipe"]
    envs, _ = ref.unpack({"a": frame(ref, "a", [3, 4]), "b": frame(ref, "b", [1000, 0])}, 0, RING)
    agg = ref.reduce(envs)
    assert agg.report is None and agg.robust is None
    assert torch.equal(agg[0], ref.codec.reduce([e.tensors["w"] for e in envs], (2,)))
    header, tensors = ref.state()
    assert "robust" not in header and not any(k.startswith("robust") for k in tensors)


def test_a_robust_state_is_refused_by_a_replica_without_reduce_and_vice_versa() -> None:
    on, off = reference(run_config(bound="clip")), reference(run_config())
    with pytest.raises(StateFormatError, match="from another recipe"):
        off.load_bytes(on.to_bytes())  # the recipes differ: recipe.reduce is in the config
    with pytest.raises(StateFormatError):
        on.load_bytes(off.to_bytes())


def test_unsigned_or_foreign_frames_never_reach_the_reduce() -> None:
    ref = reference(run_config(bound="clip"))
    frames = {"a": frame(ref, "a", [3, 4]), "b": frame(ref, "b", [3, 4], signed=False),
              "c": frame(ref, "a", [3, 4])}  # c relays a's frame
    envs, rejected = ref.unpack(frames, 0, RING)
    assert [e.sender for e in envs] == ["a"]
    assert "is not signed" in rejected["b"]
    assert "arrived as 'c'" in rejected["c"] and "a swapped sender" in rejected["c"]
    assert math.isclose(ref.reduce(envs)[0][0].item(), 3.0)
    assert KEYS["a"].public in RING.values()
