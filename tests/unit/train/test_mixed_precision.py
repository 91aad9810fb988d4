"""Mixed precision (issue 15, input 5): a bf16 (or fp16) model trains against fp32 master copies, so a worker that
makes no local progress has Δ = θ_ref − master = 0 exactly, and θ_ref does not move — for every recipe. Before,
Δ held θ_ref − bf16(θ_ref) and `dsm` moved θ_ref by 2.1e-2 in 5 rounds of no progress. Harness: models_harness.py."""
from __future__ import annotations

import pytest
import torch

from node.config import TaskConfig
from node.train.worker import Worker
from models_harness import ALL_RECIPES, GRAD_RECIPES, Cluster, ToyTask, run_config

TOY = TaskConfig("models_harness:ToyTask", {})
# every momentum, decay and feedback at 0: a zero aggregate must leave θ_ref exactly where it is
STILL = {
    "ddp": {"outer.betas": [0.0, 0.0], "outer.weight_decay": 0.0},
    "diloco": {"outer.momentum": 0.0},
    "dsm": {"outer.betas": [0.0, 0.0], "outer.weight_decay": 0.0},
    "sign": {"outer.betas": [0.0, 0.0], "outer.weight_decay": 0.0, "feedback_decay": 0.0},
    "dct": {"outer.momentum": 0.0, "feedback_decay": 0.0},
    "dct-consistent": {"feedback_decay": 0.0},
    "demo": {"feedback_decay": 0.0},
    "sparseloco": {"feedback_decay": 0.0},
    "sign-nesterov": {"outer.momentum": 0.0, "feedback_decay": 0.0},
}


def _no_progress_round(cl: Cluster, task: ToyTask, recipe: str, r: int) -> None:
    """A round without local progress: no inner step; in grad mode one step whose gradient is exactly 0."""
    task.scale = 0.0
    cl.round(r, train=recipe in GRAD_RECIPES)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("recipe", ALL_RECIPES)
def test_no_local_progress_moves_nothing(recipe: str, dtype: torch.dtype) -> None:
    assert recipe in STILL, f"recipe {recipe!r}: say which settings make a zero aggregate leave θ_ref still"
    task = ToyTask(dtype)
    cl = Cluster(run_config(recipe, TOY, STILL[recipe], workers=2, rounds=8), task)
    w = cl.workers[0]
    assert all(p.dtype == dtype for p in w.params) and all(m.dtype == torch.float32 for m in w.masters)
    for r in range(3):
        cl.round(r)
    ref = [t.clone() for t in w.ref]
    assert any(not torch.equal(t, t.to(dtype).float()) for t in ref)  # θ_ref holds what the model cannot
    for r in range(3, 8):
        _no_progress_round(cl, task, recipe, r)
        assert all(torch.equal(a, b) for a, b in zip(w.ref, ref)), r  # moved 0.0
        assert all(p.dtype == dtype for p in w.params)
    assert len(cl.prints()) == (2 if recipe == "dct" else 1)  # faithful dct drifts by design (oracle 7)


@pytest.mark.parametrize("recipe", [r for r in ALL_RECIPES if r not in GRAD_RECIPES])
def test_the_pseudo_gradient_of_no_progress_is_exactly_zero(recipe: str) -> None:
    task = ToyTask(torch.bfloat16)
    cl = Cluster(run_config(recipe, TOY, workers=2), task)
    for r in range(2):
        cl.round(r)
    w = cl.workers[0]
    w.prepare(2)  # no inner step since the round was applied
    assert all(torch.equal(d, torch.zeros_like(d)) for d in w.pending.deltas)
    # while the model itself holds only the rounded reference
    assert all(torch.equal(p, r.to(p.dtype)) for p, r in zip(w.params, w.ref))


def test_masters_carry_progress_the_model_cannot_hold() -> None:
    """An update smaller than half a bf16 ulp is lost in a bf16 parameter but kept in its fp32 master."""
    task = ToyTask(torch.bfloat16)
    cfg = run_config("diloco", TOY, {"inner.optimizer": "sgd", "inner.lr": 1e-6, "inner.grad_clip": None},
                     workers=1, H=1)
    w = Worker("w0", cfg, task, 0, 1)
    before = [p.clone() for p in w.params]
    w.train()
    assert any(not torch.equal(m, r) for m, r in zip(w.masters, w.ref))  # the fp32 masters moved
    assert all(torch.equal(p, b) for p, b in zip(w.params, before))  # the bf16 weights could not
    w.prepare(0)
    assert any(float(d.abs().max()) > 0 for d in w.pending.deltas)  # so the update still reaches the round


def test_bf16_training_follows_fp32_training() -> None:
    """Same data, same recipe: the bf16 model's reference ends close to the fp32 one's (bf16 forward/backward
    rounding only), and its loss goes down."""
    prints = {}
    for dtype in (torch.float32, torch.bfloat16):
        task = ToyTask(dtype)
        cl = Cluster(run_config("diloco", TOY, {"inner.lr": 0.05}, workers=2, rounds=6), task)
        start = task.evaluate(cl.workers[0].model)
        for r in range(6):
            cl.round(r)
        with cl.workers[0].reference_weights() as model:
            end = task.evaluate(model)
        assert end < 0.5 * start, (dtype, start, end)
        prints[dtype] = [t.clone() for t in cl.workers[0].ref]
    for a, b in zip(prints[torch.float32], prints[torch.bfloat16]):
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)
