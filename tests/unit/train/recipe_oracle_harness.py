"""Shared by the recipe oracle test modules (test_recipe_oracle_math.py, test_recipe_round_outcomes.py): a tiny
deterministic toy task, run configs for it, and a hand-driven cluster of real Workers.

Rounds are driven by hand: every worker trains and prepares its frame, frames go through an
``InProcessHub``, then every worker applies the collected round. Expected values are computed
independently (own inner loops on model copies, hand-written outer rules) in fp32, the Worker's master
precision, so tolerances are ~1e-5.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from node import wire
from node.compress import make_codec
from node.config import TaskConfig
from node.recipes import make_run_config
from node.tasks.base import Batch, Task
from node.train.worker import ApplyReport, Worker
from node.transport.inprocess import InProcessHub, RelayLink


IN, OUT, BATCH = 8, 4, 16
TOY_TASK = TaskConfig("recipe_oracle_harness:make_task", {})


# -- the toy task --------------------------------------------------------------------------------------------

class ToyModel(nn.Module):
    """Linear regression with an extra 1-D bias-like parameter (so 2-D and 1-D tensors both occur)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(IN, OUT)
        self.offset = nn.Parameter(torch.randn(OUT) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.offset


class ToyTask(Task):
    name = "toy"

    def __init__(self, batch_size: int = BATCH) -> None:
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(1234)
        self.w_true = torch.randn(OUT, IN, generator=g) * 2.0
        self.b_true = torch.randn(OUT, generator=g) + 1.0
        vg = torch.Generator().manual_seed(999)
        self.val_x = torch.randn(64, IN, generator=vg)
        self.val_y = self._target(self.val_x, vg)

    def _target(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return x @ self.w_true.T + self.b_true + 0.1 * torch.randn(x.shape[0], OUT, generator=g)

    @property
    def fingerprint(self) -> str:
        return "toy-linear-v1"

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size

    def build_model(self, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return ToyModel()

    def batches(self, worker: int, num_workers: int, seed: int) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + worker * 1009 + num_workers)
        while True:
            x = torch.randn(self.batch_size, IN, generator=g)
            yield x, self._target(x, g)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(model(x), y)

    def evaluate(self, model: nn.Module) -> float:
        with torch.no_grad():
            return float(F.mse_loss(model(self.val_x), self.val_y))


def make_task(**kwargs: Any) -> ToyTask:
    return ToyTask(**kwargs)


TASK = ToyTask()

# Constant inner lr (no warmup, no decay) unless a test says otherwise, so that references are simple.
CONST_LR = {"inner.warmup_steps": 0, "inner.min_lr_ratio": 1.0}
BLOCK_ALL = {"codec.k": 4096, "codec.values": "f32"}  # k ≥ block size: every DCT coefficient is sent


def config(recipe: str, overrides: dict[str, Any] | None = None, workers: int = 3, rounds: int = 3,
           lr: float = 0.01):
    base: dict[str, Any] = {"inner.lr": lr, **CONST_LR}
    if recipe not in ("ddp", "demo"):
        base["H"] = 3
    return make_run_config(recipe, {**base, **(overrides or {})}, task=TOY_TASK, workers=workers, rounds=rounds)


# -- driving rounds by hand -----------------------------------------------------------------------------------

class Cluster:
    def __init__(self, cfg, n: int | None = None, min_members: int = 1) -> None:
        n = cfg.workers if n is None else n
        self.cfg = cfg
        self.workers = [Worker(f"w{i}", cfg, TASK, shard=i, num_shards=n) for i in range(n)]
        self.hub = InProcessHub(min_members=min_members)
        self.links: list[RelayLink] = [self.hub.connect(w.name) for w in self.workers]
        self.lrs: list[float] = []
        self.frames: list[bytes] = []

    def train_prepare(self, r: int) -> list[bytes]:
        self.lrs, self.frames = [], []
        for w in self.workers:
            stats = w.train()
            self.lrs.append(stats.last_lr)
            self.frames.append(w.prepare(r, stats.last_lr))
        return self.frames

    def exchange(self, r: int, skip: tuple[str, ...] = (), replace: dict[str, bytes] | None = None) -> list[ApplyReport]:
        replace = replace or {}
        for w, link, frame in zip(self.workers, self.links, self.frames):
            if w.name not in skip:
                link.submit(r, replace.get(w.name, frame))
        return [w.apply(link.collect(r)) for w, link in zip(self.workers, self.links)]

    def round(self, r: int, **kw: Any) -> list[ApplyReport]:
        self.train_prepare(r)
        return self.exchange(r, **kw)

    def prints(self) -> list[str]:
        return [w.fingerprint() for w in self.workers]


def refs(w: Worker) -> list[torch.Tensor]:
    return [r.detach().clone() for r in w.ref]


def local_params(w: Worker) -> list[torch.Tensor]:
    return [p.detach().float().clone() for p in w.params]


def grads(w: Worker) -> list[torch.Tensor]:
    return [p.grad.detach().float().clone() for p in w.params]


def decode_frame(w: Worker, frame: bytes, r: int) -> list[torch.Tensor]:
    """What a receiver reconstructs from ``frame``: unpack with a fresh codec, decode per tensor."""
    codec = make_codec(w.cfg.recipe.codec.name, w.cfg.recipe.codec.params)
    env = wire.unpack(frame, codec, w.spec, w.cfg.run_id, r)
    return [codec.decode(env.tensors[n], tuple(ref.shape)) for n, ref in zip(w.names, w.ref)]


def aggregate(w: Worker, frames: list[bytes], r: int) -> list[torch.Tensor]:
    """The round's reduced aggregate Q from the given frames (sorted by sender, as the worker does)."""
    codec = make_codec(w.cfg.recipe.codec.name, w.cfg.recipe.codec.params)
    envs = sorted((wire.unpack(f, codec, w.spec, w.cfg.run_id, r) for f in frames), key=lambda e: e.sender)
    return [codec.reduce([e.tensors[n] for e in envs], tuple(ref.shape)) for n, ref in zip(w.names, w.ref)]


def assert_all_close(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 1e-5, rtol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


class RefInner:
    """An independent inner loop on a model copy: same task batches, same optimizer, constant lr."""

    def __init__(self, cfg, shard: int, n: int) -> None:
        inner = cfg.recipe.inner
        self.model = TASK.build_model(cfg.seed)
        self.params = list(self.model.parameters())
        self.clip = inner.grad_clip
        groups = [{"params": [p for p in self.params if p.dim() >= 2], "weight_decay": inner.weight_decay},
                  {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0}]
        self.opt = (torch.optim.AdamW(groups, lr=inner.lr, betas=inner.betas) if inner.optimizer == "adamw"
                    else torch.optim.SGD(groups, lr=inner.lr))
        self.batches = TASK.batches(shard, n, cfg.seed)

    def run(self, theta: list[torch.Tensor], H: int) -> list[torch.Tensor]:
        """Start from θ, take H steps, return Δ = θ − θ_after."""
        with torch.no_grad():
            for p, t in zip(self.params, theta):
                p.copy_(t)
        for _ in range(H):
            loss = TASK.loss(self.model, next(self.batches))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            self.opt.step()
        return [t - p.detach() for t, p in zip(theta, self.params)]

    def grad(self, theta: list[torch.Tensor]) -> list[torch.Tensor]:
        """One raw gradient at θ (no step): DeMo's / DDP's g."""
        with torch.no_grad():
            for p, t in zip(self.params, theta):
                p.copy_(t)
        self.model.zero_grad(set_to_none=True)
        TASK.loss(self.model, next(self.batches)).backward()
        return [p.grad.detach().clone() for p in self.params]
