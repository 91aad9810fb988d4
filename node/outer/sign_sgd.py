"""Sign-SGD with decoupled weight decay: DeMo's parameter update (arXiv 2411.19870;
docs/algorithms.md, §3 demo).

p ← p·(1 − lr·λ) − lr·sign(g), where g is the agreed DCT aggregate Q and lr = η_t (the trainer couples
it to the inner schedule).
"""
from __future__ import annotations

from typing import Iterable

import torch


class SignSGD(torch.optim.Optimizer):
    replica_consistent = True
    #: step() updates each parameter from its own .grad and state alone (in parameter order, skipping those without a
    #: .grad): stepping one parameter at a time is the full step, bit for bit (coordinator/commit.py relies on it)
    steps_each_parameter_alone = True

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1.0, weight_decay: float = 0.0) -> None:
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"sign_sgd: need lr ≥ 0 and weight_decay ≥ 0, got {lr}, {weight_decay}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1 - lr * wd).add_(torch.sign(p.grad), alpha=-lr)
