"""Evaluates the reference (parameters and buffers) off the request path, one round at a time (latest wins)."""
from __future__ import annotations

import logging
import threading
from typing import Callable, Sequence

import torch
from torch import nn

from node.tasks.base import Task
from node.train.tensors import assign, buffers as model_buffers, trainable

log = logging.getLogger(__name__)


class Evaluator:
    def __init__(self, task: Task, model: nn.Module, on_result: Callable[[int, float], None]) -> None:
        self.task, self.model, self.on_result = task, model, on_result
        self.params = [p for _, p in trainable(model)]
        self.buffers = [b for _, b in model_buffers(model)]  # the reference's buffers, in its order
        self._job: tuple[int, list[torch.Tensor], list[torch.Tensor]] | None = None
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="evaluator", daemon=True)
        self._thread.start()

    def submit(self, round_: int, tensors: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor] = ()) -> None:
        """Evaluate θ_ref (``tensors``, trainable order) with the reference ``buffers`` (model order) next."""
        with self._cv:
            self._job = (round_, [t.detach().clone() for t in tensors], [b.detach().clone() for b in buffers])
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while self._job is None and not self._stop:
                    self._cv.wait()
                if self._job is None:  # stopping, and the last submitted round is evaluated
                    return
                round_, tensors, bufs = self._job
                self._job = None
            assign(self.params, tensors)
            if bufs:
                assign(self.buffers, bufs)
            try:
                self.on_result(round_, self.task.evaluate(self.model))
            except Exception:  # evaluation must never take the coordinator down
                log.exception("evaluation of round %d failed", round_)

    def stop(self, timeout_s: float = 120.0) -> None:
        """Finish the round already submitted (its loss is recorded), then end the thread."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=timeout_s)
