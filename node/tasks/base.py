"""The Task seam: what the trainer needs from a workload, and nothing else.

A task builds the model, yields this worker's batches and evaluates a model. The trainer never looks
inside the data; users plug their own task with ``--task package.module:function`` (see ``load``). How to write
one, what lowband does with buffers, frozen and tied parameters and mixed precision: docs/tasks.md.
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

    def batches_from(self, worker: int, num_workers: int, seed: int, step: int) -> Iterator[Batch]:
        """The batches ``batches(worker, num_workers, seed)`` yields from its ``step``-th on (0-based): where a worker
        restored from a checkpoint resumes its stream. The default draws the first ``step`` batches and drops them,
        which is right for any deterministic stream but costs their generation; override it when the stream can
        seek (the built-in ``gpt`` task skips without building the windows)."""
        stream = self.batches(worker, num_workers, seed)
        for _ in range(step):
            next(stream)
        return stream

    def rng_state(self) -> bytes:
        """The task's own random state beyond its batch stream (e.g. a generator for augmentation drawn in ``loss``),
        as bytes; saved in a node's checkpoint and given back to ``set_rng_state`` on resume. Default: none."""
        return b""

    def set_rng_state(self, state: bytes) -> None:
        """Restore what ``rng_state`` returned (at most 1 MiB). Default: nothing to restore."""

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
