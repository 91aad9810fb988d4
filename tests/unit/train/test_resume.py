"""Exact resume (issue 15, input 3): the checkpoint holds the data position and every RNG state (torch's, the task's
own; the sign generator is in the run's state), and the Task seam resumes a stream at a step — so after 12 inner
steps and a restore, the next batch is step 12's, and a restored worker goes on bit-identical to one that never
stopped. Harness: models_harness.py."""
from __future__ import annotations

from typing import Iterator

import pytest
import torch

from node.tasks.base import Batch
from node.tasks.gpt import GPTTask
from node.train import checkpoint
from node.train.worker import Worker
from models_harness import Cluster, ToyTask, run_config, shapes

GPT = dict(size="tiny", batch_size=2, block_size=16, eval_batches=1, n_embd=32, n_layer=1, n_head=2)


class Recording(GPTTask):
    """The gpt task, remembering every batch handed out (its ``x``), per stream."""

    def __init__(self) -> None:
        super().__init__(**GPT)
        self.seen: list[torch.Tensor] = []

    def batches_from(self, worker: int, num_workers: int, seed: int, step: int) -> Iterator[Batch]:
        for x, y in super().batches_from(worker, num_workers, seed, step):
            self.seen.append(x.clone())
            yield x, y


def gpt_config(recipe: str = "sign"):  # type: ignore[no-untyped-def]
    from node.config import TaskConfig

    return run_config(recipe, TaskConfig("gpt", GPT), workers=1, H=3)


def test_after_12_steps_and_a_restore_the_next_batch_is_step_12s() -> None:
    cfg = gpt_config()
    task = Recording()
    cl = Cluster(cfg, task, names=("w0",))
    for r in range(4):  # 4 rounds × H 3 = 12 inner steps
        cl.round(r)
    assert cl.workers[0].inner.drawn == 12
    blob = checkpoint.dumps(cl.workers[0], node="w0", config_hash="h")
    fresh = Recording()
    again = Worker("w0", cfg, fresh, 0, 1)
    checkpoint.loads(again, blob)
    again.train()
    stream = GPTTask(**GPT).batches(0, 1, cfg.seed)
    expected = [next(stream)[0] for _ in range(15)]
    assert torch.equal(fresh.seen[0], expected[12])  # not step 0's
    assert all(torch.equal(a, b) for a, b in zip(task.seen, expected[:12]))


def test_the_gpt_stream_seeks_without_replaying() -> None:
    task = GPTTask(**GPT)
    full = task.batches(1, 3, 5)
    batches = [next(full) for _ in range(8)]
    for step in (0, 1, 7):
        x, y = next(task.batches_from(1, 3, 5, step))
        assert torch.equal(x, batches[step][0]) and torch.equal(y, batches[step][1])


def test_the_default_seam_drops_the_first_batches() -> None:
    task = ToyTask()
    from node.tasks.base import Task

    got = next(Task.batches_from(task, 0, 1, 0, 5))
    want = next(task.batches_from(0, 1, 0, 5))
    assert torch.equal(got[0], want[0])


@pytest.mark.parametrize("recipe", ["sign", "diloco", "dct-consistent", "demo"])
def test_a_restored_worker_goes_on_bit_identical_to_one_that_never_stopped(recipe: str) -> None:
    """Dropout (torch's global generator), random flips (the task's own generator), AdamW moments, the residual and
    the stream position: all in the checkpoint, so the next rounds match the uninterrupted run to the bit."""
    cfg = run_config(recipe, workers=1)
    a = Cluster(cfg, shapes(dropout=0.3), names=("w0",))
    for r in range(2):
        a.round(r)
    blob = checkpoint.dumps(a.workers[0], node="w0", config_hash="h")
    prints, masters = [], []
    for r in (2, 3):
        a.round(r)
        prints.append(a.workers[0].fingerprint())
        masters.append([m.clone() for m in a.workers[0].masters])
    torch.manual_seed(99)  # another global generator state, and another flip generator: the checkpoint has theirs
    b = Cluster(cfg, shapes(dropout=0.3), names=("w0",))
    b.task.set_rng_state(torch.Generator().manual_seed(5).get_state().numpy().tobytes())
    checkpoint.loads(b.workers[0], blob)
    for i, r in enumerate((2, 3)):
        b.round(r)
        assert b.workers[0].fingerprint() == prints[i]
        assert all(torch.equal(x, y) for x, y in zip(b.workers[0].masters, masters[i]))
    assert b.workers[0].inner.drawn == a.workers[0].inner.drawn


def test_without_its_rng_states_a_restored_worker_would_differ() -> None:
    """The control for the test above: the same restore with torch's generator moved afterwards diverges (so the
    test would catch a checkpoint that left it out)."""
    cfg = run_config("diloco", workers=1)
    a = Cluster(cfg, shapes(dropout=0.3), names=("w0",))
    a.round(0)
    blob = checkpoint.dumps(a.workers[0], node="w0", config_hash="h")
    a.round(1)
    b = Cluster(cfg, shapes(dropout=0.3), names=("w0",))
    checkpoint.loads(b.workers[0], blob)
    torch.manual_seed(99)
    b.round(1)
    assert b.workers[0].fingerprint() != a.workers[0].fingerprint()


def test_the_torch_and_task_rng_states_are_restored() -> None:
    task = shapes()
    w = Worker("w0", run_config("diloco", workers=1), task, 0, 1)
    w.train()
    torch_state, task_state = torch.get_rng_state(), task.rng_state()
    blob = checkpoint.dumps(w, node="w0", config_hash="h")
    torch.rand(100)
    task.set_rng_state(torch.Generator().manual_seed(3).get_state().numpy().tobytes())
    checkpoint.loads(w, blob)
    assert torch.equal(torch.get_rng_state(), torch_state) and task.rng_state() == task_state


def test_a_checkpoint_of_another_shard_starts_the_new_shards_stream_over() -> None:
    cfg = run_config("diloco", workers=2)
    w = Worker("w0", cfg, shapes(), 0, 2)
    w.train()
    other = Worker("w0", cfg, shapes(), 1, 2)
    checkpoint.loads(other, checkpoint.dumps(w, node="w0", config_hash="h"))
    assert other.inner.drawn == 0 and other.inner.step == w.inner.step
