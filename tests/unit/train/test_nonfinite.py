"""Non-finite steps (issue 15, input 2; docs/algorithms.md §10): a NaN batch on worker b in round 1 of a 3-worker
run. The step is skipped (counted, with its cause), nothing non-finite reaches b's residual, inner moments, buffers,
frame or the reference, and b is a member of every round. A local state poisoned anyway is reset from θ_ref and
the worker stays in the run. Harness: models_harness.py."""
from __future__ import annotations

import logging

import pytest
import torch

from node import wire
from node.train.tensors import first_nonfinite
from node.train.worker import Worker
from models_harness import ALL_RECIPES, Cluster, PoisonedShapes, ToyTask, run_config

H = 3
POISON_STEP = H + 1  # b's second inner step of round 1


def all_finite(w: Worker) -> bool:
    named = [(n, m) for n, m in zip(w.names, w.masters)] + list(w.feedback.residuals.items())
    named += list(zip(w.reference.buffer_names, w.buffers)) + list(zip(w.names, w.ref))
    return first_nonfinite(named) is None and w.inner.state_is_finite() is None


@pytest.mark.parametrize("recipe", [r for r in ALL_RECIPES if r != "dct"])  # faithful dct drifts by design
def test_a_nan_batch_is_skipped_and_the_worker_stays_in_every_round(recipe: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    steps = (1,) if recipe in ("demo", "ddp") else (POISON_STEP,)  # one step per round in grad mode: round 1's
    task = PoisonedShapes(shard=1, steps=steps)
    cl = Cluster(run_config(recipe, H=H), task, names=("a", "b", "c"))
    b = cl.workers[1]
    with caplog.at_level(logging.WARNING, logger="node.train.inner"):
        for r in range(4):
            stats = []
            for w, link in zip(cl.workers, cl.links):
                stats.append(w.train())
                link.submit(r, w.prepare(r))
            reports = [w.apply(link.collect(r)) for w, link in zip(cl.workers, cl.links)]
            assert all(rep.members == ("a", "b", "c") for rep in reports), (r, reports)  # b contributes every round
            assert [s.skipped for s in stats] == ([0, 1, 0] if r == 1 else [0, 0, 0])
            assert all(all_finite(w) for w in cl.workers)
            assert len(cl.prints()) == 1
    assert b.inner.skipped == 1 and b.resets == 0
    cause = f"inner step {steps[0]} skipped: loss is nan"
    assert any(cause in rec.getMessage() for rec in caplog.records), [r.getMessage() for r in caplog.records]


def test_the_skipped_step_leaves_moments_buffers_and_params_as_they_were() -> None:
    task = PoisonedShapes(shard=0, steps=(0,))
    w = Worker("w0", run_config("diloco", H=1), task, 0, 1)
    masters = [m.clone() for m in w.masters]
    buffers = [b.clone() for b in w.buffers]
    stats = w.train()
    assert stats.skipped == 1 and stats.skip_cause == "step 0: loss is nan" and stats.mean_loss != stats.mean_loss
    assert all(torch.equal(a, b) for a, b in zip(masters, w.masters))
    assert all(torch.equal(a, b) for a, b in zip(buffers, w.buffers))  # the forward's statistics were put back
    assert w.inner.optimizer.state == {}  # no moment was ever created
    assert w.inner.drawn == 1 and w.inner.step == 1  # the batch is used up, the schedule moves on
    w.train()
    assert w.inner.skipped == 1 and all_finite(w)


class _SqrtAtZero(ToyTask):
    """A finite loss whose gradient is NaN (d sqrt(x)/dx at 0 times 0): the gradient check, not the loss check."""

    def loss(self, model, batch):  # type: ignore[no-untyped-def]
        return super().loss(model, batch) + torch.sqrt(model.lin.bias[0] * 0.0)


def test_a_finite_loss_with_a_non_finite_gradient_is_skipped_naming_the_tensor() -> None:
    w = Worker("w0", run_config("diloco", task=_config_of(_SqrtAtZero)), _SqrtAtZero(), 0, 1)
    stats = w.train()
    assert stats.skipped == H and stats.skip_cause == "step 0: gradient 'lin.bias' holds nan"
    assert all_finite(w)


def _config_of(task_cls):  # type: ignore[no-untyped-def]
    from node.config import TaskConfig

    return TaskConfig(f"models_harness:{task_cls.__name__}", {})


@pytest.mark.parametrize("where", ["master", "moment", "buffer"])
def test_a_poisoned_local_state_is_reset_and_the_worker_contributes_on(where: str) -> None:
    cl = Cluster(run_config("sign", H=H), PoisonedShapes(steps=()), names=("a", "b", "c"))
    cl.round(0)
    b = cl.workers[1]
    for w in cl.workers:
        w.train()
    with torch.no_grad():  # poisoned behind the skip check's back (a user's in-place op, a bad optimizer)
        if where == "master":
            b.masters[0][0, 0, 0, 0] = float("inf")
        elif where == "moment":
            next(iter(b.inner.optimizer.state.values()))["exp_avg_sq"].fill_(float("nan"))
        else:
            b.buffers[0].fill_(float("nan"))
    frames = [w.prepare(1) for w in cl.workers]
    assert b.resets == 1 and b.pending.reset
    assert all(torch.equal(d, torch.zeros_like(d)) for d in b.pending.deltas)  # this round it sends Δ = 0
    ref = b.reference
    wire.unpack(frames[1], ref.codec, ref.spec, ref.cfg.run_id, 1, extra_spec=ref.buffer_spec)  # a valid frame
    for link, frame in zip(cl.links, frames):
        link.submit(1, frame)
    reports = [w.apply(link.collect(1)) for w, link in zip(cl.workers, cl.links)]
    assert all(rep.members == ("a", "b", "c") for rep in reports)
    assert all(all_finite(w) for w in cl.workers) and len(cl.prints()) == 1
    for r in (2, 3):  # and from the next round on it trains and contributes as before
        reports = cl.round(r)
        assert all(rep.members == ("a", "b", "c") for rep in reports)
        assert b.pending is None and b.resets == 1
        assert any(not torch.equal(d, torch.zeros_like(d)) for d in _last_deltas(b, cl, r + 1))


def _last_deltas(b: Worker, cl: Cluster, r: int) -> list[torch.Tensor]:
    b.train()
    b.prepare(r)
    return b.pending.deltas


def test_a_poisoned_residual_is_dropped_not_sent() -> None:
    cl = Cluster(run_config("sign", H=H), PoisonedShapes(steps=()), names=("a", "b", "c"))
    cl.round(0)
    b = cl.workers[1]
    name = b.names[0]
    b.feedback.residuals[name].fill_(float("nan"))
    b.train()
    b.prepare(1)
    assert first_nonfinite([(name, b.pending.wanted[0])]) is None
    assert first_nonfinite(b.feedback.residuals.items()) is None


def test_a_pseudo_gradient_that_overflows_when_scaled_counts_as_poisoned() -> None:
    """dsm sends Δ/η_t: a finite Δ near fp32's limit overflows when scaled. That is a poisoned state (reset, Δ = 0),
    never a non-finite frame or an endless retry."""
    cl = Cluster(run_config("dsm", H=H), PoisonedShapes(steps=()), names=("a", "b"))
    cl.round(0)
    b = cl.workers[1]
    b.train()
    with torch.no_grad():
        b.masters[0].fill_(-3e38)  # Δ = θ_ref + 3e38: finite; Δ / 0.01 is not
    b.prepare(1)
    assert b.resets == 1 and b.pending.reset.startswith("pseudo-gradient 'conv1.weight' holds inf")
    assert all(float(d.abs().max()) == 0.0 for d in b.pending.deltas)
