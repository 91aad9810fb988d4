"""Shared by the robust-reduce tests: a ``Reference`` of one 2-element tensor fed hand-made frames, signed by keys of
their senders, and a tiny linear task for tests that need real ``Worker``s."""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from node import wire
from node.config import RunConfig, TaskConfig
from node.identity import NodeKey
from node.keyring import KeyRing
from node.recipes import make_run_config
from node.tasks.base import Batch, Task
from node.train.reference import Aggregate, Reference

RUN = "robust-test"
KEYS = {name: NodeKey.generate() for name in ("a", "b", "c", "d", "e")}
RING = KeyRing({n: k.public for n, k in KEYS.items()})


def run_config(recipe: str = "diloco", task: TaskConfig | None = None, **reduce: Any) -> RunConfig:
    """``recipe`` with H = 2 and the ``reduce`` fields given; diloco as plain averaging SGD (lr 1, no momentum), so an
    aggregate is easy to read off θ_ref."""
    overrides: dict[str, Any] = {"H": 2, **{f"reduce.{k}": v for k, v in reduce.items()}}
    if recipe == "diloco":
        overrides |= {"outer.lr": 1.0, "outer.momentum": 0.0}
    return make_run_config(recipe, overrides, run_id=RUN, task=task or TaskConfig())


def reference(cfg: RunConfig, shape: tuple[int, ...] = (2,)) -> Reference:
    return Reference(cfg, [("w", torch.zeros(shape))])


def frame(ref: Reference, sender: str, values: Sequence[float], round_: int = 0, signed: bool = True) -> bytes:
    x = torch.tensor(values, dtype=torch.float32).reshape(ref.tensors[0].shape)
    return wire.pack(RUN, round_, sender, ref.codec, ref.spec, {"w": ref.codec.encode(x)},
                     key=KEYS[sender] if signed else None)


def reduce_round(ref: Reference, payloads: dict[str, Sequence[float]], round_: int = 0, apply: bool = True
                 ) -> Aggregate:
    """Pack, verify, unpack and reduce one round of ``payloads`` (sender → values); step the reference unless
    ``apply`` is False."""
    envs, rejected = ref.unpack({s: frame(ref, s, v, round_) for s, v in payloads.items()}, round_, RING)
    assert not rejected, rejected
    agg = ref.reduce(envs)
    if apply:
        ref.step(agg, round_)
    return agg


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))


class LinearTask(Task):
    """y = ⟨w*, x⟩ + noise, 3 inputs: fast, deterministic, with a real gradient."""

    name = "linear"

    def __init__(self, batch_size: int = 8) -> None:
        self.batch_size = batch_size
        self.target = torch.tensor([1.0, -2.0, 0.5])

    @property
    def fingerprint(self) -> str:
        return "robust-linear-v1"

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size

    def build_model(self, seed: int) -> nn.Module:
        return Linear()

    def batches(self, worker: int, num_workers: int, seed: int) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(seed * 101 + worker)
        while True:
            x = torch.randn(self.batch_size, 3, generator=g)
            yield x, x @ self.target + 0.01 * torch.randn(self.batch_size, generator=g)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(x @ model.w, y)  # type: ignore[operator]

    def evaluate(self, model: nn.Module) -> float:
        x = torch.randn(64, 3, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            return float(F.mse_loss(x @ model.w, x @ self.target))  # type: ignore[operator]


def make_linear_task(**kwargs: Any) -> LinearTask:
    return LinearTask(**kwargs)


LINEAR = TaskConfig("robust_harness:make_linear_task", {})
