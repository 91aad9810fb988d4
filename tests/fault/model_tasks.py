"""Tasks for the real-model daemon tests (test_daemon_models.py), importable by name from a run's config: the
tests' tiny gpt, poisoned at one inner step of one shard, and recording where each stream started."""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from node.tasks.base import Batch
from node.tasks.gpt import GPTTask


class ModelTestGPT(GPTTask):
    """``poison_shard``'s loss is NaN at its inner step ``poison_step`` (0-based, its own count of training losses);
    ``starts`` lists the step every stream of this instance started at (``batches_from``)."""

    def __init__(self, poison_shard: int = -1, poison_step: int = -1, **params: Any) -> None:
        super().__init__(**params)
        self.poison_shard, self.poison_step = poison_shard, poison_step
        self.shard = -1
        self.calls = 0
        self.starts: list[int] = []

    def batches_from(self, worker: int, num_workers: int, seed: int, step: int) -> Iterator[Batch]:
        self.shard = worker
        self.starts.append(step)
        return super().batches_from(worker, num_workers, seed, step)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        loss = super().loss(model, batch)
        if model.training:
            self.calls += 1
            if self.shard == self.poison_shard and self.calls == self.poison_step + 1:
                return loss * float("nan")
        return loss


def model_test_gpt(**params: Any) -> ModelTestGPT:
    return ModelTestGPT(**params)
