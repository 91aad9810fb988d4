"""SGD with Nesterov momentum on the pseudo-gradient: DiLoCo's outer optimizer.

Torch semantics: b ← μ·b + g (b starts at g), θ ← θ − lr·(g + μ·b). With μ = 0 it is plain SGD
(θ ← θ − lr·g), used by ``dct-consistent`` to apply the agreed DCT aggregate directly.
See docs/algorithms.md, §3 diloco and dct-consistent.
"""
from __future__ import annotations

from typing import Iterable

import torch


class NesterovSGD(torch.optim.Optimizer):
    replica_consistent = True
    #: step() updates each parameter from its own .grad and state alone (in parameter order, skipping those without a
    #: .grad): stepping one parameter at a time is the full step, bit for bit (coordinator/commit.py relies on it)
    steps_each_parameter_alone = True

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 0.7, momentum: float = 0.9) -> None:
        if lr < 0 or not 0.0 <= momentum < 1.0:
            raise ValueError(f"nesterov: need lr ≥ 0 and 0 ≤ momentum < 1, got lr={lr}, momentum={momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if mu > 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = g.clone()
                    else:
                        buf.mul_(mu).add_(g)
                    g = g.add(buf, alpha=mu)
                p.add_(g, alpha=-lr)
