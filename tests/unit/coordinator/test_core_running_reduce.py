"""The round's reduce taken frame by frame as the coordinator accepts them (coordinator/accumulate.py): bit-identical
to the codec's reduce and ``Reference.reduce_buffers`` over the same frames in the same order (an independent
oracle: the all-at-once reduce), recorded with its order, replayed in it after a restart, and used only where the
round allows it. Harness: core_harness.py; fixtures ``clock``, ``make``: conftest.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core_harness import Clock, Harness
from coordinator.accumulate import RunningReduce
from coordinator.commit import applied_as
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
