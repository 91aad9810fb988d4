"""Distributed sign momentum (arXiv 2411.17866; docs/algorithms.md, §3 dsm): a Lion-style global step on the
mean update d.

Per coordinate, with lr = γ·η_t set each round by the trainer:
    c = β1·m + (1 − β1)·d
    x ← (1 − λ·lr)·x − lr·sign(c)        # decoupled weight decay on ALL tensors, then the sign step
    m ← β2·m + (1 − β2)·d
``d`` arrives as ``.grad``; the recipe divides pseudo-gradients by η_t before they are exchanged, so
d = (θ_ref − x̄)/η_t exactly as in the reference code. ``sign_mode="randomized"`` uses the paper's
stochastic sign S(c)_j = +1 w.p. ½(1 + c_j/B) with B = max|c| per tensor (an option, not the default;
the bound B per tensor is lowband's choice). Its generator is seeded identically on every replica, and its state is
part of ``state_dict()`` (key ``"generator"``, the uint8 state of a CPU ``torch.Generator``): a replica that takes
the run's state, or resumes from a checkpoint, draws the same signs as every other one from the next round on.
"""
from __future__ import annotations

from typing import Iterable

import torch


class SignMomentum(torch.optim.Optimizer):
    replica_consistent = True
    #: step() updates each parameter from its own .grad and state alone (in parameter order, skipping those without a
    #: .grad): stepping one parameter at a time is the full step, bit for bit (coordinator/commit.py relies on it)
    steps_each_parameter_alone = True

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1.0, betas: tuple[float, float] = (0.95, 0.98),
                 weight_decay: float = 0.1, sign_mode: str = "exact", seed: int = 0) -> None:
        b1, b2 = betas
        if lr < 0 or not (0 <= b1 <= 1 and 0 <= b2 <= 1) or weight_decay < 0:
            raise ValueError(f"sign_momentum: need lr ≥ 0, betas in [0,1], weight_decay ≥ 0; got {lr}, {betas}, {weight_decay}")
        if sign_mode not in ("exact", "randomized"):
            raise ValueError(f"sign_momentum.sign_mode must be 'exact' or 'randomized', got {sign_mode!r}")
        super().__init__(params, {"lr": lr, "betas": (b1, b2), "weight_decay": weight_decay})
        self.sign_mode = sign_mode
        self._generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:  # type: ignore[override]
        """torch's optimizer state plus ``"generator"``: the randomized sign's generator state, (5056,) uint8."""
        state = super().state_dict()
        state["generator"] = self._generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        """Inverse of ``state_dict``; a dict without ``"generator"`` leaves the generator as it is. Raises
        ValueError when the generator state is not a CPU generator's."""
        state_dict = dict(state_dict)
        generator = state_dict.pop("generator", None)
        if generator is not None:
            template = self._generator.get_state()
            if not isinstance(generator, torch.Tensor) or generator.dtype != torch.uint8 or \
                    generator.shape != template.shape:
                raise ValueError(f"sign_momentum: generator state must be {tuple(template.shape)} uint8")
            self._generator.set_state(generator.clone())
        super().load_state_dict(state_dict)

    def _sign(self, c: torch.Tensor) -> torch.Tensor:
        if self.sign_mode == "exact":
            return torch.sign(c)
        bound = c.abs().max().clamp_min(torch.finfo(c.dtype).tiny)
        u = torch.rand(c.shape, generator=self._generator, dtype=c.dtype).to(c.device)
        return torch.where(u < 0.5 * (1 + c / bound), 1.0, -1.0).to(c.dtype)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                m = self.state[p].get("exp_avg")
                if m is None:
                    m = self.state[p]["exp_avg"] = torch.zeros_like(p)
                c = m.mul(b1).add_(d, alpha=1 - b1)
                p.mul_(1 - wd * lr).add_(self._sign(c), alpha=-lr)
                m.mul_(b2).add_(d, alpha=1 - b2)
