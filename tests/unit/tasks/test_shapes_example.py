"""The example task of docs/tasks.md (node/tasks/examples/shapes.py): found by its documented name, deterministic,
seekable, with buffers, a frozen parameter, an optional bf16 model and its own RNG state."""
from __future__ import annotations

import pytest
import torch

from node.tasks import load_task
from node.tasks.base import build_seeded
from node.tasks.examples.shapes import ShapesTask
from node.train.tensors import buffers, trainable

SMALL = dict(batch_size=4, channels=4, size=8)


def test_loads_by_its_documented_name() -> None:
    task = load_task("node.tasks.examples.shapes:shapes_task", **SMALL)
    assert isinstance(task, ShapesTask) and task.tokens_per_batch == 4
    assert task.fingerprint == ShapesTask(**SMALL).fingerprint != ShapesTask(**{**SMALL, "noise": 0.1}).fingerprint


def test_what_lowband_sees_of_the_model() -> None:
    model = build_seeded(ShapesTask(**SMALL), 0)
    assert [n for n, _ in trainable(model)] == ["conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias", "conv2.weight",
                                                "conv2.bias", "bn2.weight", "bn2.bias", "head.weight", "head.bias"]
    assert not model.stem.weight.requires_grad  # frozen: built from the seed, never exchanged
    assert [(n, b.dtype) for n, b in buffers(model)][:3] == [("bn1.running_mean", torch.float32),
                                                              ("bn1.running_var", torch.float32),
                                                              ("bn1.num_batches_tracked", torch.int64)]


def test_the_stream_is_deterministic_disjoint_and_seekable() -> None:
    task = ShapesTask(**SMALL)
    a = [next(task.batches(0, 2, 7)) for _ in range(1)][0]
    it = task.batches(0, 2, 7)
    first = [next(it) for _ in range(5)]
    assert torch.equal(a[0], first[0][0])
    assert torch.equal(next(task.batches_from(0, 2, 7, 3))[0], first[3][0])
    assert not torch.equal(next(task.batches(1, 2, 7))[0], first[0][0])
    x, y = first[0]
    assert x.shape == (4, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_the_task_rng_state_round_trips() -> None:
    task = ShapesTask(**SMALL)
    model = build_seeded(task, 0)
    batch = next(task.batches(0, 1, 0))
    state = task.rng_state()
    first = task.loss(model, batch)
    task.set_rng_state(state)
    assert torch.equal(task.loss(model, batch), first)


@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_a_half_precision_model(dtype: str, torch_dtype: torch.dtype) -> None:
    task = ShapesTask(**SMALL, dtype=dtype)
    model = build_seeded(task, 0)
    assert all(p.dtype == torch_dtype for p in model.parameters())
    loss = task.loss(model, next(task.batches(0, 1, 0)))
    assert loss.dtype == torch.float32 and bool(torch.isfinite(loss))
    assert 0.0 < task.evaluate(model) < 10.0


def test_bad_parameters_are_refused() -> None:
    for bad in (dict(size=4), dict(dtype="int8"), dict(batch_size=0), dict(dropout=1.0)):
        with pytest.raises(ValueError):
            ShapesTask(**{**SMALL, **bad})
