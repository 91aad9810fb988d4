"""Shared by the real-model test modules (test_buffers.py, test_nonfinite.py, test_resume.py, test_mixed_precision.py,
test_state_format.py, test_export.py): small tasks with what real models have — BatchNorm buffers, a frozen
parameter, bf16/fp16 weights, dropout, a NaN batch — and a hand-driven cluster of real Workers for any task.

Rounds are driven by hand, as in recipe_oracle_harness.py: every worker trains and prepares its frame, frames go
through an ``InProcessHub``, then every worker applies the collected round."""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from node.config import RunConfig, TaskConfig
from node.recipes import make_run_config
from node.tasks.base import Batch, Task
from node.tasks.examples.shapes import ShapesTask
from node.train.worker import ApplyReport, Worker
from node.transport.inprocess import InProcessHub, RelayLink

SHAPES = TaskConfig("node.tasks.examples.shapes:shapes_task", {"batch_size": 8, "channels": 4, "size": 8})
from node.recipes import RECIPES

ALL_RECIPES = sorted(RECIPES)  # every named recipe, so a new one is covered as it lands
GRAD_RECIPES = ("ddp", "demo")


def shapes(**kw: Any) -> ShapesTask:
    return ShapesTask(**{**SHAPES.params, **kw})


class PoisonedShapes(ShapesTask):
    """The shapes task whose shard ``shard`` gets a batch of NaN images at its inner steps ``steps`` (0-based: the
    batch index in that worker's stream)."""

    def __init__(self, shard: int = 1, steps: tuple[int, ...] = (4,), **kw: Any) -> None:
        super().__init__(**{**SHAPES.params, **kw})
        self.shard, self.steps = shard, set(steps)

    def batches_from(self, worker: int, num_workers: int, seed: int, step: int) -> Iterator[Batch]:
        for i, (x, y) in enumerate(super().batches_from(worker, num_workers, seed, step), start=step):
            if worker == self.shard and i in self.steps:
                x = torch.full_like(x, float("nan"))
            yield x, y


class Linear(nn.Module):
    """y = W x + b + dropout noise (p = ``dropout``): something the global torch RNG changes."""

    def __init__(self, dtype: torch.dtype, dropout: float) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 3)
        self.drop = nn.Dropout(dropout)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.drop(x.to(self.lin.weight.dtype)))


class ToyTask(Task):
    """Linear regression with a settable loss scale (0: every gradient exactly 0) and dtype."""

    name = "toy"

    def __init__(self, dtype: torch.dtype = torch.float32, dropout: float = 0.0, batch: int = 8) -> None:
        self.dtype, self.dropout, self.batch = dtype, dropout, batch
        self.scale = 1.0
        g = torch.Generator().manual_seed(7)
        self.w = torch.randn(3, 6, generator=g)

    @property
    def fingerprint(self) -> str:
        return f"toy-{self.dtype}-{self.dropout}"

    @property
    def tokens_per_batch(self) -> int:
        return self.batch

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return Linear(self.dtype, self.dropout)

    def batches(self, worker: int, num_workers: int, seed: int) -> Iterator[Batch]:
        return self.batches_from(worker, num_workers, seed, 0)

    def batches_from(self, worker: int, num_workers: int, seed: int, step: int) -> Iterator[Batch]:
        i = step
        while True:
            g = torch.Generator().manual_seed(seed * 100_003 + worker * 1009 + i)
            x = torch.randn(self.batch, 6, generator=g)
            yield x, x @ self.w.T
            i += 1

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(model(x).float(), y) * self.scale

    def evaluate(self, model: nn.Module) -> float:
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            return float(F.mse_loss(model(x).float(), x @ self.w.T))


def run_config(recipe: str, task: TaskConfig = SHAPES, overrides: dict[str, Any] | None = None, workers: int = 3,
               rounds: int = 4, H: int = 3) -> RunConfig:
    base: dict[str, Any] = {"inner.lr": 0.01, "inner.warmup_steps": 0, "inner.min_lr_ratio": 1.0}
    if recipe not in GRAD_RECIPES:
        base["H"] = H
    return make_run_config(recipe, {**base, **(overrides or {})}, task=task, workers=workers, rounds=rounds)


class Cluster:
    """``n`` workers of ``cfg`` on ``task`` (one task object, as the simulator shares it), relayed in process."""

    def __init__(self, cfg: RunConfig, task: Task, n: int | None = None, names: tuple[str, ...] | None = None) -> None:
        names = names or tuple(f"w{i}" for i in range(cfg.workers if n is None else n))
        self.cfg, self.task = cfg, task
        self.workers = [Worker(name, cfg, task, shard=i, num_shards=len(names)) for i, name in enumerate(names)]
        self.hub = InProcessHub(min_members=1)
        self.links: list[RelayLink] = [self.hub.connect(w.name) for w in self.workers]

    def round(self, r: int, train: bool = True, skip: tuple[str, ...] = ()) -> list[ApplyReport]:
        for w, link in zip(self.workers, self.links):
            if train:
                w.train()
            frame = w.prepare(r)
            if w.name not in skip:
                link.submit(r, frame)
        return [w.apply(link.collect(r)) for w, link in zip(self.workers, self.links)]

    def prints(self) -> set[str]:
        return {w.fingerprint() for w in self.workers}


def buffers_of(w: Worker) -> list[torch.Tensor]:
    return [b.detach().clone() for b in w.buffers]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))
