"""Outer optimizers (axis 2): plain ``torch.optim.Optimizer``s fed the round's aggregate as ``.grad``."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from node.errors import ConfigError
from node.outer.decoupled import DecoupledNesterov
from node.outer.nesterov import NesterovSGD
from node.outer.sign_momentum import SignMomentum
from node.outer.sign_sgd import SignSGD

NamedTensors = Sequence[tuple[str, torch.Tensor]]


def _adamw(named: NamedTensors, lr: float = 1.0, betas: Sequence[float] = (0.9, 0.95), weight_decay: float = 0.1,
           eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW with weight decay on ≥2-D tensors only: the ``ddp`` baseline's step on the mean gradient."""
    decay = [t for _, t in named if t.dim() >= 2]
    rest = [t for _, t in named if t.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=tuple(betas), eps=eps)


def _plain(cls: type[torch.optim.Optimizer]) -> Callable[..., torch.optim.Optimizer]:
    def build(named: NamedTensors, **kw: Any) -> torch.optim.Optimizer:
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return cls([t for _, t in named], **kw)
    return build


OUTER_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "nesterov": _plain(NesterovSGD),
    "sign_momentum": _plain(SignMomentum),
    "sign_sgd": _plain(SignSGD),
    "decoupled_nesterov": _plain(DecoupledNesterov),
    "adamw": _adamw,
}


def make_outer(name: str, named: NamedTensors, lr: float, params: dict[str, Any]) -> torch.optim.Optimizer:
    """Build an outer optimizer over the fp32 reference tensors; unknown names/params raise ConfigError."""
    build = OUTER_OPTIMIZERS.get(name)
    if build is None:
        raise ConfigError(f"unknown outer optimizer {name!r}; known: {sorted(OUTER_OPTIMIZERS)}")
    try:
        return build(named, lr=lr, **params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"outer optimizer {name!r}: bad parameters {params}: {exc}") from None


#: The class behind each name: what a configuration can ask about an optimizer before building one.
OUTER_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "nesterov": NesterovSGD,
    "sign_momentum": SignMomentum,
    "sign_sgd": SignSGD,
    "decoupled_nesterov": DecoupledNesterov,
    "adamw": torch.optim.AdamW,
}


def is_replica_consistent(opt: torch.optim.Optimizer) -> bool:
    """Whether every worker ends a round with identical parameters (joiners may copy the reference)."""
    return bool(getattr(opt, "replica_consistent", True))


def outer_is_replica_consistent(name: str) -> bool:
    """``is_replica_consistent`` asked of a configuration (the optimizer's name), before any optimizer exists:
    the same class attribute, looked up on the registered class. Unknown names raise ConfigError."""
    cls = OUTER_CLASSES.get(name)
    if cls is None:
        raise ConfigError(f"unknown outer optimizer {name!r}; known: {sorted(OUTER_CLASSES)}")
    return bool(getattr(cls, "replica_consistent", True))


__all__ = ["OUTER_OPTIMIZERS", "OUTER_CLASSES", "make_outer", "is_replica_consistent", "outer_is_replica_consistent",
           "NesterovSGD", "SignMomentum", "SignSGD", "DecoupledNesterov"]
