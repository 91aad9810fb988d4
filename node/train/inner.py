"""The inner loop: H local steps of any torch optimizer on this worker's batches.

Inner optimizer state (AdamW moments) is local and persists across rounds; it is never exchanged.
bf16 autocast is used on CUDA; parameters stay fp32 so the outer step always works on fp32 masters.
"""
from __future__ import annotations

import contextlib
import time

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from node.config import InnerConfig
from node.tasks.base import Batch, Task
from node.train.schedule import inner_lr, warmup_steps


@dataclass
class InnerStats:
    steps: int
    tokens: int
    mean_loss: float
    last_lr: float  # η_t: the inner lr of the round's last step
    compute_s: float


def make_inner_optimizer(cfg: InnerConfig, model: nn.Module) -> torch.optim.Optimizer | None:
    """AdamW with decay on ≥2-D tensors only; SGD; or None for ``grad`` (no local step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "grad":
        return None
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    return torch.optim.SGD(groups, lr=cfg.lr)


class InnerLoop:
    """Runs H inner steps; in ``grad`` mode it accumulates one gradient and leaves parameters alone."""

    def __init__(self, cfg: InnerConfig, task: Task, model: nn.Module, batches: Iterator[Batch],
                 total_steps: int, device: torch.device) -> None:
        self.cfg, self.task, self.model, self.batches = cfg, task, model, batches
        self.total_steps, self.device = total_steps, device
        self.optimizer = make_inner_optimizer(cfg, model)
        self.step = 0  # global inner step count, drives the schedule

    def lr_at(self, step: int) -> float:
        c = self.cfg
        return inner_lr(step, c.lr, warmup_steps(c.warmup_steps, self.total_steps), self.total_steps, c.min_lr_ratio)

    def run(self, H: int) -> InnerStats:
        start = time.perf_counter()
        self.model.train()
        losses = []
        lr = self.lr_at(self.step)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        for _ in range(H):
            lr = self.lr_at(self.step)
            x, y = next(self.batches)
            batch = (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
            with autocast:
                loss = self.task.loss(self.model, batch)
            self.model.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            if self.optimizer is not None:
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.optimizer.step()
            losses.append(loss.detach())
            self.step += 1
        mean_loss = float(torch.stack(losses).float().mean())
        return InnerStats(H, H * self.task.tokens_per_batch, mean_loss, lr, time.perf_counter() - start)

    def state_dict(self) -> dict:
        return {"step": self.step, "optimizer": self.optimizer.state_dict() if self.optimizer else None}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
