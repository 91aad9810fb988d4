"""Decoupled DCT momentum, faithful to "Distributed Low-Communication Training with Decoupled Momentum
Optimization" (arXiv 2510.03371; docs/algorithms.md, §3 dct).

Each worker's Nesterov buffer δ_i is the error-feedback residual of the DCT-top-k codec (decay β):
δ ← β·δ + Δ, the top-k part is sent and removed. This optimizer finishes the round:
    δ_i ← δ_i + Q                          # Q = the agreed aggregate, arrives as .grad
    θ_i ← θ_ref,i − lr·(Δ_i + β·δ_i)        # the worker's OWN Δ_i: replicas drift apart by design
The trainer hands over Δ_i and the residual tensors each round with ``set_round_context``; δ is updated
in place so the codec's feedback sees the absorbed Q next round.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch


class DecoupledNesterov(torch.optim.Optimizer):
    replica_consistent = False

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 0.7, momentum: float = 0.95) -> None:
        if lr < 0 or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"decoupled_nesterov: need lr ≥ 0 and momentum in [0, 1]; got {lr}, {momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum})
        self._context: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None

    def set_round_context(self, local_deltas: Sequence[torch.Tensor], residuals: Sequence[torch.Tensor]) -> None:
        """This worker's Δ_i and δ_i (after removing what it sent), in parameter order."""
        self._context = (local_deltas, residuals)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        if self._context is None:
            raise RuntimeError("decoupled_nesterov.step() needs set_round_context() first")
        deltas, residuals = self._context
        params = [p for g in self.param_groups for p in g["params"]]
        assert len(params) == len(deltas) == len(residuals), "round context must cover every parameter"
        i = 0
        for group in self.param_groups:
            lr, beta = group["lr"], group["momentum"]
            for p in group["params"]:
                delta, buf = deltas[i], residuals[i]
                i += 1
                if p.grad is None:
                    continue
                buf.add_(p.grad)
                p.sub_(delta.add(buf, alpha=beta), alpha=lr)
        self._context = None
