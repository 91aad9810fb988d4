"""Byzantine attacks for ``lowband bench byzantine``: each is a transformation of the attacker's scaled pseudo-gradient
``x`` (per tensor, fp32, model order) before error feedback and the codec (``Worker.prepare(transform=...)``), so the
attacker still sends well-formed frames, signed with its own key: what the receivers' bounds and robust reduce must
cope with.

- ``scale``: ``x · 1e12`` (the incident of issue 14 sent sign scales of 9.9e29; the codec saturates what exceeds its
  wire range).
- ``flip``: ``−x``.
- ``noise``: Gaussian noise with the norm of ``x``, per tensor (seeded per attacker).
- ``alie``: "a little is enough" (Baruch, Baruch, Goldberg, NeurIPS 2019, arXiv 1902.06156): ``μ − z·σ``
  coordinate-wise over the honest workers' ``x`` of the same round (an omniscient attacker). The paper's
  ``z_max = Φ⁻¹((n − s)/n)`` with ``s = ⌊n/2 + 1⌋ − m`` is 0 for 8 workers and one attacker (no attack at all) and
  0.32 for two; this benchmark uses ``z = 1``, a stronger consistent shift that still sits inside the honest spread.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from node.bench.byzantine import ATTACKS
from node.train.worker import Transform, Worker

__all__ = ["ATTACKS", "make_attack"]
SCALE = 1e12
ALIE_Z = 1.0


def _scale(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x * SCALE for x in xs]


def _flip(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [-x for x in xs]


def _noise(seed: int) -> Transform:
    gen = torch.Generator().manual_seed(seed)

    def noise(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for x in xs:
            xi = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.device)
            norm = float(xi.norm())
            out.append(xi * (float(x.norm()) / norm) if norm > 0 else torch.zeros_like(x))
        return out

    return noise


def _alie(honest: Callable[[], Sequence[Worker]], me: Callable[[], Worker]) -> Transform:
    def alie(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        workers = [w for w in honest() if w.pending is not None]
        if len(workers) < 2:
            return xs  # no spread to hide in
        round_ = workers[0].pending.round  # type: ignore[union-attr]
        scale = me().payload_scale(round_)
        out = []
        for t in range(len(xs)):
            stack = torch.stack([w.pending.deltas[t].to(xs[t].device) * scale for w in workers])  # type: ignore[union-attr]
            out.append(stack.mean(dim=0) - ALIE_Z * stack.std(dim=0))
        return out

    return alie


def make_attack(name: str, seed: int, honest: Callable[[], Sequence[Worker]],
                me: Callable[[], Worker]) -> Transform:
    """The transform of attack ``name`` (one of ``ATTACKS``). ``honest``: the honest workers, which prepared this
    round's frames before the attacker (``alie`` reads their pseudo-gradients); ``me``: the attacker. Raises
    ValueError for an unknown attack."""
    if name == "scale":
        return _scale
    if name == "flip":
        return _flip
    if name == "noise":
        return _noise(seed)
    if name == "alie":
        return _alie(honest, me)
    raise ValueError(f"unknown attack {name!r}; known: {ATTACKS}")
