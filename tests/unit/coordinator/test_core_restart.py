"""CoordinatorCore with a fake clock: state transfer, status, restarts over the same state dir, and the
aggregate result mode. Harness: core_harness.py; fixtures ``clock``, ``make``, ``h``: conftest.py."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from core_harness import Clock, Harness
from coordinator.errors import NotSubmitted, ResumeMismatch
from node.errors import ConfigError
from node.membership import RESTART_GRACE_S
from node.train.reference import Reference
from node.transport.messages import RoundResult, RoundStatus


# -- state, status, restart --------------------------------------------------------------------------
def test_fetch_state_is_the_reference_and_resumes_by_offset(h: Harness) -> None:
    h.join("a"), h.join("b")
    h.submit("a", 0), h.submit("b", 0)
    parts = list(h.core.fetch_state(h.ids["a"], 0))
    blob = b"".join(p["data"] for p in parts)
    assert {p["committed_rounds"] for p in parts} == {1} and parts[0]["total_size"] == len(blob)
    assert parts[0]["reference_fingerprint"] == h.core.reference.fingerprint()
    model = h.core.task.build_model(h.cfg.run.seed)
    fresh = Reference(h.cfg.run, [(n, p) for n, p in model.named_parameters() if p.requires_grad])
    fresh.load_bytes(blob)
    assert fresh.fingerprint() == h.core.reference.fingerprint() and fresh.committed_rounds == 1
    tail = list(h.core.fetch_state(h.ids["a"], 100))
    assert tail[0]["offset"] == 100 and b"".join(p["data"] for p in tail) == blob[100:]
    with pytest.raises(ResumeMismatch, match=f"offset {len(blob) + 1} is past the end of the {len(blob)}-byte state") \
            as info:
        list(h.core.fetch_state(h.ids["a"], len(blob) + 1))
    assert info.value.code == "OUT_OF_RANGE"  # the one meaning of OUT_OF_RANGE: a byte offset outside what is held


def test_members_a_restart_restores_have_the_grace_to_reconnect_then_the_lease_rules(
        make: Callable[..., Harness], clock: Clock) -> None:
    """A channel backs off up to 5 s before it finds a restarted coordinator, then heartbeats: with a short lease the
    restored members would be expelled before they could. They get ``RESTART_GRACE_S``, no more."""
    h1 = make()
    h1.join("a"), h1.join("b")
    h1.close()
    h2 = make()
    clock.advance(RESTART_GRACE_S - 0.5)  # 14.5 s of silence: more than the 10 s lease, less than the grace
    h2.core.tick()
    assert len(h2.core.members) == 2
    clock.advance(1.0)
    h2.core.tick()
    assert h2.core.members == {}


def test_status_reports_members_rounds_and_submissions(h: Harness, clock: Clock) -> None:
    h.join("a"), h.join("b")
    h.submit("a", 0, loss=3.0), h.submit("b", 0, loss=1.0)
    clock.advance(1.0)
    h.submit("b", 1)
    s = h.core.status()
    assert s["run_id"] == "core-test" and s["recipe"] == "sign"
    assert s["current_round"] == 1 and s["committed_rounds"] == 1
    assert s["submitted"] == ["b"]
    # round 0's spread was 0 s: × margin, clamped up to min_wait_s = 1 s after b's payload at T0 + 1
    assert s["deadline_in_s"] == pytest.approx(1.0)
    assert sorted(m.name for m in s["members"]) == ["a", "b"]
    assert [r.round for r in s["recent"]] == [0] and s["recent"][0].mean_loss == pytest.approx(2.0)
    assert s["reference_fingerprint"] == h.core.reference.fingerprint()


def test_restart_resumes_rounds_fingerprint_and_members(make: Callable[..., Harness], clock: Clock) -> None:
    h1 = make()
    ja, jb = h1.join("a"), h1.join("b")
    h1.submit("a", 0), h1.submit("b", 0)
    h1.submit("a", 1)  # accepted but held only in memory
    fp, ids, spreads = h1.core.reference.fingerprint(), dict(h1.ids), list(h1.core.spreads)
    assert len(spreads) == 1
    h1.close()
    clock.advance(100.0)  # far past every lease: a restart must not expel everyone
    h2 = make()
    assert h2.core.reference.committed_rounds == 1 and h2.core.open_round == 1
    assert h2.core.reference.fingerprint() == fp
    assert list(h2.core.spreads) == pytest.approx(spreads)  # the adaptive deadline keeps its history
    assert {nid: (m.name, m.shard) for nid, m in h2.core.members.items()} == \
        {ja["node_id"]: ("a", 0), jb["node_id"]: ("b", 1)}
    assert all(m.rounds_contributed == 1 for m in h2.core.members.values())
    h2.core.tick()
    assert len(h2.core.members) == 2
    # the last result is served from disk; the lost payload of round 1 must be resubmitted
    result, to_send = h2.core.collect(ids["a"], 0, 0.0, True)
    assert result.reason == "restored" and list(result.frames) == ["a", "b"] and to_send == ["b"]
    with pytest.raises(NotSubmitted, match="no payload from a for round 1 is held"):
        h2.core.collect(ids["a"], 1, 0.0, True)
    h2.ids, h2.keys = ids, h1.keys  # the same nodes, with the keys their frames are signed with
    assert result.keys == {"a": h1.keys["a"].public, "b": h1.keys["b"].public}  # relayed with the restored result
    h2.submit("a", 1), h2.submit("b", 1)
    assert h2.core.reference.committed_rounds == 2


def test_a_restored_result_carries_the_keys_that_signed_its_frames(make: Callable[..., Harness],
                                                                   clock: Clock) -> None:
    """The round's keys are stored with its frames: after a restart the result names the signer of a frame whose
    sender left since (the members' keys would lack it, and nodes then get no keys at all: all or none)."""
    h1 = make()
    for name in ("a", "b", "c"):
        h1.join(name)
    for name in ("a", "b", "c"):
        h1.submit(name, 0)
    assert h1.core.reference.committed_rounds == 1
    h1.core.leave(h1.ids["c"], "done")
    ids, keys = dict(h1.ids), h1.keys
    h1.close()
    h2 = make()
    result, _ = h2.core.collect(ids["a"], 0, 0.0, True)
    assert result.reason == "restored" and list(result.frames) == ["a", "b", "c"]
    assert result.keys == {n: keys[n].public for n in ("a", "b", "c")}


@pytest.mark.parametrize("overrides, what", [
    ({"recipe": {"H": 2}}, "config hash"),
    ({"run": {"id": "another-run"}}, "run 'another-run'"),
])
def test_a_different_run_file_on_the_same_state_dir_is_refused(make: Callable[..., Harness],
                                                               overrides: dict, what: str) -> None:
    make().close()
    with pytest.raises(ConfigError, match="Use another --state-dir") as info:
        make(overrides)
    assert what in str(info.value)
    # the same run with more rounds is the same math: allowed
    make({"run": {"rounds": 20}})


@pytest.mark.parametrize("codec", ["identity", "bf16"])
def test_aggregate_mode_sends_one_frame_and_replicas_match(tmp_path: Path, clock: Clock, codec: str) -> None:
    """result = "aggregate": the coordinator reduces, applies the decoded aggregate, and every member applying
    the same frame lands on the coordinator's fingerprint."""
    h = Harness(tmp_path / "state", clock, {"rounds": {"result": "aggregate", "aggregate_codec": codec}})
    try:
        ja, jb = h.join("a"), h.join("b")
        workers = {"a": h.worker("a", ja), "b": h.worker("b", jb)}
        for r in range(2):
            for name, w in workers.items():
                w.train()
                h.submit(name, r, w.prepare(r))
            result, to_send = h.core.collect(h.ids["a"], r, 0.0, True)
            assert to_send == [] and result.aggregate is not None
            for w in workers.values():
                report = w.apply(RoundResult(r, RoundStatus.COMMITTED, aggregate=result.aggregate, aggregate_codec=codec,
                                             aggregate_members=tuple(result.frames)))
                assert report.committed and report.contributed and report.members == ("a", "b")
            assert all(w.fingerprint() == h.core.reference.fingerprint() == result.fingerprint
                       for w in workers.values())
        assert h.store.aggregate(1) == result.aggregate
        bad = bytearray(result.aggregate)
        bad[-1] ^= 1
        w = workers["a"]
        w.train()
        w.prepare(2)
        report = w.apply(RoundResult(2, RoundStatus.COMMITTED, aggregate=bytes(bad), aggregate_codec=codec, aggregate_members=("a",)))
        assert not report.committed and "digest mismatch" in report.rejected["coordinator"]
    finally:
        h.close()
