"""The round's reduce taken frame by frame as the coordinator accepts them (coordinator/accumulate.py): bit-identical
to the codec's reduce and ``Reference.reduce_buffers`` over the same frames in the same order (an independent
oracle: the all-at-once reduce), recorded with its order, replayed in it after a restart, and used only where the
round allows it. Harness: core_harness.py; fixtures ``clock``, ``make``: conftest.py."""
from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import torch

from core_harness import Clock, Harness
from coordinator.accumulate import RunningReduce
from coordinator.commit import applied_as
from coordinator.errors import Conflict, NotSubmitted
from coordinator.store import Disk, Store, WalError
from coordinator.wal_stream import HeldFrame
from node import wire
from node.config import TaskConfig
from node.recipes import make_run_config
from node.tasks import load_task
from node.tasks.base import build_seeded
from node.train.reference import Reference
from node.transport.messages import RoundResult, RoundStatus

SHAPES = TaskConfig("node.tasks.examples.shapes:shapes_task", {"batch_size": 8, "channels": 4, "size": 8})


def _reference(recipe: str, overrides: dict | None = None) -> Reference:
    cfg = make_run_config(recipe, overrides or {}, task=SHAPES, workers=2, rounds=4)
    return Reference.for_model(cfg, build_seeded(load_task(cfg.task.name, **cfg.task.params), cfg.seed))


def _envelopes(ref: Reference, senders: list[str], seed: int = 3) -> list[wire.Envelope]:
    """One frame per sender: random pseudo-gradients encoded with the run's codec, random buffers (floating ones
    of mixed magnitudes, counters, flags) — packed and unpacked as the coordinator receives them."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for sender in senders:
        enc = {s.name: ref.codec.encode(torch.randn(s.shape, generator=gen) * 10 ** torch.randint(-3, 2, (1,),
                                                                                               generator=gen).item())
               for s in ref.spec}
        extra = {}
        for e in ref.buffer_spec:
            if e.dtype.is_floating_point:
                extra[e.name] = (torch.randn(e.shape, generator=gen) * 1e3).to(e.dtype)
            elif e.dtype == torch.bool:
                extra[e.name] = torch.rand(e.shape, generator=gen) > 0.5
            else:
                extra[e.name] = torch.randint(0, 1000, e.shape, generator=gen).to(e.dtype)
        frame = wire.pack(ref.cfg.run_id, 0, sender, ref.codec, ref.spec, enc, ref.buffer_spec, extra)
        out.append(wire.unpack(frame, ref.codec, ref.spec, ref.cfg.run_id, 0, extra_spec=ref.buffer_spec))
    return out


@pytest.mark.parametrize("recipe, overrides, order_shows", [
    ("sign", {}, True),
    # bf16 scales have 8 significant bits: sums of five of them are exact in fp32, whatever the order
    ("sign", {"codec.params": {"block": 64, "scale_dtype": "bf16", "reduce": "mean"}}, False),
    ("diloco", {}, True)], ids=["sign", "sign-block64-bf16", "identity"])
def test_frame_by_frame_is_the_all_at_once_reduce_in_the_same_order(recipe: str, overrides: dict,
                                                                     order_shows: bool) -> None:
    ref = _reference(recipe, overrides)
    assert ref.buffer_spec, "the model must have buffers for this test to check them"
    envs = _envelopes(ref, ["d", "a", "e", "c", "b"])  # an arrival order that is not the senders' sorted order
    running = RunningReduce(ref)
    for env in envs:
        running.add(env)
    got = running.aggregate()
    for i, (name, t) in enumerate(zip(ref.names, ref.tensors)):
        want = ref.codec.reduce([e.tensors[name] for e in envs], tuple(t.shape))
        assert torch.equal(got[i], want), name
    for g, w in zip(got.buffers, ref.reduce_buffers(envs)):
        assert g.dtype == w.dtype and torch.equal(g, w)
    again = running.aggregate()  # a commit that failed prepares again: the same result, the sums untouched
    assert all(torch.equal(a, b) for a, b in zip(again, got))
    with pytest.raises(ValueError, match="in the round already"):
        running.add(envs[0])
    # the order shows in the last bits: a reduce that re-sorted the senders would not pass the checks above
    by_name = sorted(envs, key=lambda e: e.sender)
    assert not order_shows or any(not torch.equal(got[i], ref.codec.reduce([e.tensors[n] for e in by_name], tuple(t.shape)))
               for i, (n, t) in enumerate(zip(ref.names, ref.tensors)))


def test_only_rounds_that_receive_an_aggregate_and_reduce_by_an_ordered_mean_run_frame_by_frame() -> None:
    sign = _reference("sign")
    assert RunningReduce.applies(sign, {"result": "compressed"})
    assert RunningReduce.applies(sign, {"result": "aggregate", "codec": "bf16"})
    assert not RunningReduce.applies(sign, {"result": "relay"})  # members reduce themselves, in sorted order
    vote = _reference("sign", {"codec.params": {"block": 0, "scale_dtype": "f32", "reduce": "vote"}})
    assert not RunningReduce.applies(vote, {"result": "compressed"})
    assert not RunningReduce.applies(_reference("dct-consistent"), {"result": "aggregate"})  # a selector mean
    robust = _reference("sign", {"reduce.bound": "clip"})
    assert robust.robust is not None and not RunningReduce.applies(robust, {"result": "compressed"})


COMPRESSED = {"run": {"recipe": "sign-nesterov"}, "rounds": {"result": "compressed", "snapshot_every": 100},
              "membership": {"min_nodes": 3, "max_nodes": 3}}


def test_the_order_frames_came_in_is_recorded_and_a_restart_replays_it(tmp_path: Path, clock: Clock) -> None:
    """Three members submit in the order c, a, b: the aggregate they all apply is the frame-by-frame reduce in that
    order, the write-ahead record says so, and a coordinator restarted on the state dir replays the rounds from the
    seed to the fingerprint every member holds."""
    h = Harness(tmp_path / "state", clock, COMPRESSED)
    joins = {n: h.join(n) for n in ("a", "b", "c")}
    workers = {n: h.worker(n, j) for n, j in joins.items()}
    for r in range(3):
        for n in ("c", "a", "b"):
            w = workers[n]
            w.train()
            h.submit(n, r, w.prepare(r))
        result, to_send = h.core.collect(h.ids["a"], r, 0.0, True)
        assert to_send == [] and result.aggregate is not None
        for w in workers.values():
            assert w.apply(RoundResult(r, RoundStatus.COMMITTED, aggregate=result.aggregate,
                                       aggregate_codec=h.cfg.result_codec, aggregate_members=tuple(result.frames))
                           ).committed
        assert h.store.record(r)["applied"] == {**applied_as(h.cfg), "order": ["c", "a", "b"]}
    fingerprint = h.core.reference.fingerprint()
    assert all(w.fingerprint() == fingerprint for w in workers.values())
    h.core.snapshots.wait()  # a crash: the store closed without the final snapshot a clean stop would write
    h.store.close()
    h2 = Harness(tmp_path / "state", clock, COMPRESSED)  # no snapshot but the seed's: all three rounds replayed
    try:
        assert h2.core.reference.committed_rounds == 3 and h2.core.reference.fingerprint() == fingerprint
    finally:
        h2.close()


class FlakyDisk(Disk):
    """Fails the next ``fail`` publications of a write-ahead record (the fsync/rename of ``result-*``) with ENOSPC."""

    def __init__(self) -> None:
        self.fail = 0

    def publish(self, f: Any, path: Path) -> None:
        if path.name.startswith("result-") and self.fail:
            self.fail -= 1
            raise OSError(errno.ENOSPC, "No space left on device (publishing the write-ahead record)")
        super().publish(f, path)


def _submit_all(h: Harness, workers: dict, r: int, order: tuple[str, ...]) -> dict[str, bytes]:
    frames = {}
    for n in order:
        workers[n].train()
        frames[n] = workers[n].prepare(r)
        h.submit(n, r, frames[n])
    return frames


def test_accepted_frames_are_kept_on_disk_only_and_a_repeat_is_told_from_a_different_frame(
        tmp_path: Path, clock: Clock) -> None:
    """While the round is open the coordinator holds each accepted frame's size and digest, not its bytes: the frames
    are in the round's record file as they come. A repeated upload of the same frame is accepted again, a different
    one refused; the committed record holds exactly the frames, in the order they came."""
    h = Harness(tmp_path / "state", clock, COMPRESSED)
    try:
        workers = {n: h.worker(n, h.join(n)) for n in ("a", "b", "c")}
        frames = _submit_all(h, workers, 0, ("b", "c"))
        held = [h.core.submitted[h.ids[n]][0] for n in ("b", "c")]
        assert all(isinstance(x, HeldFrame) for x in held) and [len(x) for x in held] == [len(frames["b"]),
                                                                                          len(frames["c"])]
        assert h.submit("b", 0, frames["b"])["accepted"]  # a retry after a lost answer: the same bytes
        with pytest.raises(Conflict, match="different payload"):
            h.submit("c", 0, frames["b"][:-1] + bytes([frames["b"][-1] ^ 1]))
        assert (tmp_path / "state" / "result-00000000.msgpack.tmp").exists()
        frames.update(_submit_all(h, workers, 0, ("a",)))
        rec = h.store.record(0)
        assert list(rec["frames"]) == ["b", "c", "a"] and rec["frames"] == frames
        assert rec["applied"]["order"] == ["b", "c", "a"]
        assert not (tmp_path / "state" / "result-00000000.msgpack.tmp").exists()
    finally:
        h.close()


def test_a_record_that_cannot_be_published_leaves_the_round_open_and_a_retry_commits_it(
        tmp_path: Path, clock: Clock) -> None:
    """The publication failed before the rename (its fsync: what the file holds on disk is then unknown, and the
    frames are nowhere else): the round stays open without them, members are told at Collect to send them again
    (NotSubmitted), and the round commits from the frames sent again."""
    disk = FlakyDisk()
    h = Harness(tmp_path / "state", clock, COMPRESSED, disk=disk)
    try:
        workers = {n: h.worker(n, h.join(n)) for n in ("a", "b", "c")}
        disk.fail = 1
        frames = _submit_all(h, workers, 0, ("c", "b", "a"))
        assert h.core.open_round == 0 and not h.core.persistence.ok and h.store.last_round() is None
        assert not h.core.submitted and not list((tmp_path / "state").glob("result-*"))
        clock.advance(1.0)  # past the first retry's backoff: the coordinator's tick finds the disk writable
        h.core.tick()
        assert h.core.open_round == 0 and h.core.persistence.ok
        with pytest.raises(NotSubmitted):
            h.core.collect(h.ids["c"], 0, 0.0, True)
        for n in ("c", "b", "a"):
            h.submit(n, 0, frames[n])
        assert h.core.open_round == 1
        rec = h.store.record(0)
        assert list(rec["frames"]) == ["c", "b", "a"] and rec["frames"] == frames
    finally:
        h.close()


def test_a_damaged_or_unfinished_streamed_record_is_refused_and_an_open_rounds_record_is_cut_at_restart(
        tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path / "state", clock, COMPRESSED)
    workers = {n: h.worker(n, h.join(n)) for n in ("a", "b", "c")}
    _submit_all(h, workers, 0, ("a", "b", "c"))
    _submit_all(h, workers, 1, ("a",))  # round 1 stays open: its record is a .tmp file
    d = tmp_path / "state"
    assert (d / "result-00000001.msgpack.tmp").exists()
    h.core.snapshots.wait()
    h.store.close()  # a crash
    blob = (d / "result-00000000.msgpack").read_bytes()
    for damaged in (blob[:-1], blob + b"\x00", blob[:200] + bytes([blob[200] ^ 1]) + blob[201:]):
        (d / "result-00000000.msgpack").write_bytes(damaged)
        with pytest.raises(WalError):
            Store(d).record(0)
    (d / "result-00000000.msgpack").write_bytes(blob)
    h2 = Harness(d, clock, COMPRESSED)
    try:
        assert not (d / "result-00000001.msgpack.tmp").exists()  # the open round's frames: submitted again
        assert h2.core.open_round == 1 and h2.core.reference.committed_rounds == 1
    finally:
        h2.close()


def test_status_hashes_the_reference_once_per_committed_round(tmp_path: Path, clock: Clock) -> None:
    """Status (the dashboard, `lowband status`) shows the reference's fingerprint; hashing a large state takes
    seconds under the coordinator's lock, so it is hashed once per committed round, not once per call."""
    h = Harness(tmp_path / "state", clock, COMPRESSED)
    try:
        workers = {n: h.worker(n, h.join(n)) for n in ("a", "b", "c")}
        _submit_all(h, workers, 0, ("a", "b", "c"))
        want = h.core.reference.fingerprint()
        hashed = []
        real = type(h.core.reference).fingerprint
        h.core.reference.fingerprint = lambda: hashed.append(1) or real(h.core.reference)  # type: ignore[method-assign]
        assert [h.core.status()["reference_fingerprint"] for _ in range(5)] == [want] * 5
        assert hashed == []  # the commit hashed it already
        _submit_all(h, workers, 1, ("a", "b", "c"))
        assert len(hashed) == 1  # the commit of round 1
        assert h.core.status()["reference_fingerprint"] == real(h.core.reference) and len(hashed) == 1
    finally:
        h.close()
