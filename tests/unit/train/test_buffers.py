"""Buffers (issue 15, input 1; docs/algorithms.md §10): a model with BatchNorm. Each frame carries its sender's
buffers; a committed round sets the reference buffers to the mean over the members (floating, fp64 accumulation in
sender order) or the max (integer); they join the fingerprint, the state, a joiner's replica, the checkpoint and
evaluation. A model without buffers sends frames with no ``extra`` field. Harness: models_harness.py."""
from __future__ import annotations

import msgpack
import pytest
import torch

from node import wire
from node.errors import PayloadError
from node.train import checkpoint
from node.train.worker import Worker
from models_harness import SHAPES, Cluster, buffers_of, run_config, same, shapes


def sent_buffers(cl: Cluster) -> list[list[torch.Tensor]]:
    return [[b.clone() for b in w.pending.buffers] for w in cl.workers]


@pytest.mark.parametrize("recipe", ["diloco", "sign", "dct-consistent", "dsm"])
def test_every_replica_holds_the_members_mean_of_the_buffers(recipe: str) -> None:
    task = shapes()
    cl = Cluster(run_config(recipe), task)
    names = cl.workers[0].reference.buffer_names
    assert names == ["bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked", "bn2.running_mean",
                     "bn2.running_var", "bn2.num_batches_tracked"]
    for r in range(3):
        for w, link in zip(cl.workers, cl.links):
            w.train()
            link.submit(r, w.prepare(r))
        sent = sent_buffers(cl)
        assert not same(sent[0], sent[1])  # each worker's statistics are its own data's before the round
        for w, link in zip(cl.workers, cl.links):
            w.apply(link.collect(r))
        for i, name in enumerate(names):
            values = [s[i] for s in sent]
            if values[0].is_floating_point():  # the mean, summed in fp64 in sender order (w0, w1, w2)
                want = (values[0].double() + values[1].double() + values[2].double()).div(3).to(values[0].dtype)
            else:
                want = torch.stack(values).amax(0)  # num_batches_tracked: the max
            for w in cl.workers:
                assert torch.equal(w.reference.buffers[i], want), (name, r)
                assert torch.equal(w.buffers[i], want)  # the model takes the agreed value, like θ_ref
        assert len(cl.prints()) == 1
    assert int(cl.workers[0].reference.buffers[2]) == 3 * 3  # H steps × 3 rounds, every worker alike


def test_the_fingerprint_covers_the_buffers() -> None:
    w = Worker("w0", run_config("diloco"), shapes(), 0, 1)
    before = w.fingerprint()
    w.reference.buffers[1].add_(1.0)  # running_var alone
    assert w.fingerprint() != before


def test_a_joiner_takes_the_buffers_with_the_state_and_stays_identical() -> None:
    task = shapes()
    cfg = run_config("diloco")
    cl = Cluster(cfg, task)
    for r in range(3):
        cl.round(r)
    joiner = Worker("late", cfg, task, 3, 4)
    assert not same(joiner.reference.buffers, cl.workers[0].reference.buffers)  # its fresh [1, 1, 1] statistics
    joiner.adopt_global_state(cl.workers[0].reference.to_bytes())
    assert same(joiner.reference.buffers, cl.workers[0].reference.buffers)
    assert same(buffers_of(joiner), buffers_of(cl.workers[0]))
    assert joiner.fingerprint() == cl.workers[0].fingerprint()
    # one more round with the joiner in it: everyone, the joiner too, ends identical
    cl.workers.append(joiner)
    cl.links.append(cl.hub.connect(joiner.name))
    reports = cl.round(3)
    assert all(rep.members == ("late", "w0", "w1", "w2") for rep in reports)
    assert len(cl.prints()) == 1


def test_evaluation_uses_the_agreed_buffers() -> None:
    """The same reference parameters scored with whose buffers? The agreed ones, identically on every replica."""
    task = shapes()
    cl = Cluster(run_config("diloco"), task)
    for r in range(3):
        cl.round(r)
    losses = set()
    for w in cl.workers:
        with w.reference_weights() as model:
            losses.add(task.evaluate(model))
    assert len(losses) == 1
    w = cl.workers[0]
    with w.reference_weights() as model:  # with the initial statistics instead, the score differs
        for b in model.buffers():
            if b.is_floating_point():
                b.fill_(1.0)
        assert task.evaluate(model) not in losses


def test_a_restarted_worker_keeps_its_statistics() -> None:
    task = shapes()
    cfg = run_config("diloco", workers=1)
    cl = Cluster(cfg, task, names=("w0",))
    w = cl.workers[0]
    for r in range(2):
        cl.round(r)
    again = Worker("w0", cfg, task, 0, 1)
    checkpoint.loads(again, checkpoint.dumps(w, node="w0", config_hash="h"))
    assert same(buffers_of(again), buffers_of(w)) and same(again.reference.buffers, w.reference.buffers)
    assert again.fingerprint() == w.fingerprint()


def test_the_aggregate_result_carries_the_buffers() -> None:
    """Coordinator-side reduce (result = "aggregate"): the one dense frame carries the agreed buffers exactly."""
    task = shapes()
    cl = Cluster(run_config("diloco"), task)
    for w in cl.workers:
        w.train()
    frames = {w.name: w.prepare(0) for w in cl.workers}
    coordinator = Worker("coordinator-replica", cl.cfg, task, 0, 1).reference
    envelopes, rejected = coordinator.unpack(frames, 0)
    assert not rejected
    frame, decoded = coordinator.pack_aggregate(coordinator.reduce(envelopes), 0, "bf16")
    back = cl.workers[0].reference.unpack_aggregate(frame, 0, "bf16")
    assert same(back.buffers, decoded.buffers) and same(decoded.buffers, coordinator.reduce_buffers(envelopes))


def test_overlap_shifts_the_buffers_like_the_parameters() -> None:
    """With overlap, round 0 is applied after round 1's steps: b ← b + (agreed − sent), keeping what those steps
    gathered on top of the agreed value; the reference buffers stay identical everywhere."""
    cl = Cluster(run_config("diloco", overrides={"overlap": True}), shapes())
    for w, link in zip(cl.workers, cl.links):
        w.train()
        link.submit(0, w.prepare(0))
    sent = sent_buffers(cl)
    results = [link.collect(0) for link in cl.links]
    for w in cl.workers:
        w.train()  # round 1, while round 0 was on its way
    local = [buffers_of(w) for w in cl.workers]
    for w, res in zip(cl.workers, results):
        w.apply(res)
    agreed = cl.workers[0].reference.buffers
    assert len(cl.prints()) == 1
    for k, w in enumerate(cl.workers):
        for i, b in enumerate(w.buffers):
            if b.is_floating_point():
                want = (local[k][i].double() + (agreed[i].double() - sent[k][i].double())).to(b.dtype)
            else:
                want = local[k][i] + (agreed[i] - sent[k][i])
            assert torch.equal(b, want), (w.name, i)
    assert int(agreed[2]) == 3 and int(cl.workers[0].buffers[2]) == 6  # round 0's 3 steps agreed, plus round 1's 3


def test_frames_of_a_model_without_buffers_are_unchanged() -> None:
    from recipe_oracle_harness import TASK, config

    w = Worker("w0", config("diloco"), TASK, 0, 1)
    assert w.reference.buffer_spec == []
    w.train()
    body = msgpack.unpackb(w.prepare(0)[4:-8], raw=False)
    assert "extra" not in body


def _frame_with_buffers() -> tuple[Worker, bytes]:
    w = Worker("w0", run_config("diloco"), shapes(), 0, 1)
    w.train()
    return w, w.prepare(0)


def _repack(frame: bytes, change) -> bytes:  # type: ignore[no-untyped-def]
    body = msgpack.unpackb(frame[4:-8], raw=False)
    change(body)
    packed = msgpack.packb(body, use_bin_type=True)
    return wire.MAGIC + packed + wire._digest(packed)


@pytest.mark.parametrize("change, needle", [
    (lambda b: b.pop("extra"), "fields"),
    (lambda b: b["extra"].pop(), "one entry per model buffer"),
    (lambda b: b["extra"][0].__setitem__(0, "bn9.running_mean"), "expected buffer 'bn1.running_mean'"),
    (lambda b: b["extra"][0].__setitem__(1, "F16"), "dtype 'F16'"),
    (lambda b: b["extra"][0].__setitem__(2, [5]), r"shape \[5\]"),
    (lambda b: b["extra"][0].__setitem__(3, b["extra"][0][3][:-1]), "bytes of binary"),
    (lambda b: b["extra"][1].__setitem__(3, torch.full((4,), float("nan")).numpy().tobytes()), "non-finite"),
])
def test_a_frame_with_bad_buffers_is_refused(change, needle: str) -> None:  # type: ignore[no-untyped-def]
    w, frame = _frame_with_buffers()
    ref = w.reference
    wire.unpack(frame, ref.codec, ref.spec, ref.cfg.run_id, 0, extra_spec=ref.buffer_spec)
    with pytest.raises(PayloadError, match=needle):
        wire.unpack(_repack(frame, change), ref.codec, ref.spec, ref.cfg.run_id, 0, extra_spec=ref.buffer_spec)


def test_the_frame_size_formula_counts_the_buffers() -> None:
    w, frame = _frame_with_buffers()
    assert w.payload_bytes() == len(frame)
    assert wire.max_frame_size(w.codec, w.spec, w.reference.buffer_spec) >= len(frame)


def test_task_config_names_the_example() -> None:
    assert SHAPES.name == "node.tasks.examples.shapes:shapes_task"
