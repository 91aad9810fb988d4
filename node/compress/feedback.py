"""Error feedback: what a lossy codec did not send stays local and is added to the next upload.

``decay`` = 1 is classic error feedback (e ← u − sent, nothing is ever lost). ``decay`` = β < 1 turns
the residual into a decoupled momentum buffer, as in DeMo and decoupled DCT momentum (δ ← β·δ + Δ, send
top-k of δ, δ ← δ − sent). The residual is the only state; it never leaves the worker. See
docs/algorithms.md, §4.
"""
from __future__ import annotations

import torch


class ErrorFeedback:
    """Per-tensor residuals keyed by tensor name."""

    def __init__(self, decay: float = 1.0) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"feedback.decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.residuals: dict[str, torch.Tensor] = {}

    def compensate(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """u = decay·e + x: what this worker wants to send this round (a new tensor)."""
        e = self.residuals.get(name)
        if e is None:
            return x.detach().clone()
        return e.mul(self.decay).add_(x)

    def commit(self, name: str, u: torch.Tensor, transmitted: torch.Tensor) -> None:
        """The round took ``transmitted``: keep e = u − transmitted."""
        self.residuals[name] = u - transmitted

    def keep(self, name: str, u: torch.Tensor) -> None:
        """The upload missed the round: nothing was transmitted, all of u stays local."""
        self.residuals[name] = u.detach().clone()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.residuals.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.residuals = {k: v.clone() for k, v in state.items()}


class NoFeedback(ErrorFeedback):
    """Lossless codecs (or recipes that accept the loss): the residual is dropped."""

    def __init__(self) -> None:
        super().__init__(decay=0.0)

    def compensate(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x.detach()

    def commit(self, name: str, u: torch.Tensor, transmitted: torch.Tensor) -> None:
        pass

    def keep(self, name: str, u: torch.Tensor) -> None:
        pass


def make_feedback(decay: float | None) -> ErrorFeedback:
    """``None`` → no error feedback; otherwise a residual with that decay."""
    return NoFeedback() if decay is None else ErrorFeedback(decay)
