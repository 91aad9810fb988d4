"""The Task seam: what the trainer needs from a workload, and nothing else.

A task builds the model, yields this worker's batches and evaluates a model. The trainer never looks
inside the data; users plug their own task with ``--task package.module:function`` (see ``load``).
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Iterator

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]
_BUILDING = threading.Lock()


class Task(ABC):
    """A training workload. Implementations must be deterministic given their arguments."""

    #: short name recorded in results ("gpt", or the user's)
    name: str = "task"

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """Hex digest identifying data + model shape; runs with different fingerprints are incompatible."""

    @property
    @abstractmethod
    def tokens_per_batch(self) -> int:
        """Tokens (or samples) consumed by one batch from ``batches``; used for equal-token accounting."""

    @abstractmethod
    def build_model(self, seed: int) -> nn.Module:
        """A freshly initialised model; the same seed gives bit-identical parameters."""

    @abstractmethod
    def batches(self, worker: int, num_workers: int, seed: int) -> Iterator[Batch]:
        """Endless batches from this worker's shard; shards of different workers are disjoint."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Scalar training loss of ``model`` on ``batch`` (already on the model's device)."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> float:
        """Mean validation loss on a fixed held-out set (same set every call)."""


def build_seeded(task: Task, seed: int) -> nn.Module:
    """``task.build_model(seed)`` with torch's global generator seeded and restored around it, one build at a time in
    the process. Module constructors draw their initial weights from the global generator: two builds running at
    once in threads (daemons in one process, a coordinator's evaluator beside its reference) would interleave their
    draws and start from different weights. Every replica's initial model comes from here."""
    with _BUILDING, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return task.build_model(seed)
