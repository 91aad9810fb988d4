"""An example task (docs/tasks.md): a small CNN with BatchNorm classifying generated images of four shapes.

Run it with ``--task node.tasks.examples.shapes:shapes_task`` (parameters with ``--set task.KEY=VALUE`` or a run
file's ``[task]`` section). It needs no download and shows every part of the ``Task`` seam a real model touches:

- **buffers**: two ``BatchNorm2d`` layers (``running_mean``, ``running_var``: averaged across the round's members;
  ``num_batches_tracked``: the max), which ``evaluate`` uses in eval mode;
- **a frozen parameter**: ``stem`` is a fixed edge filter (``requires_grad = False``), built from the seed on every
  replica and never exchanged;
- **mixed precision**: ``dtype="bfloat16"`` builds a bf16 model; lowband trains it against fp32 master copies;
- **a seekable stream**: batch ``i`` of a worker is generated from (seed, worker, i) alone, so ``batches_from``
  starts at any step at no cost;
- **the task's own RNG**: random flips drawn in ``loss`` from the task's generator, saved in a node's checkpoint
  through ``rng_state``/``set_rng_state``; ``dropout > 0`` draws from torch's global generator, which the
  checkpoint saves too.

Images: ``size``×``size``, one channel; class 0 a horizontal bar, 1 a vertical bar, 2 a diagonal, 3 a centred
square; position jitter and Gaussian noise of standard deviation ``noise``. Inputs (B, 1, size, size) float32,
labels (B,) int64.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from node.tasks.base import Batch, Task

CLASSES = 4
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _seed(*parts: int) -> int:
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_images(labels: torch.Tensor, size: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """(B,) int64 labels → (B, 1, size, size) float32 images drawn from ``gen``."""
    n = labels.numel()
    img = torch.zeros(n, size, size)
    shift = torch.randint(-size // 4, size // 4 + 1, (n, 2), generator=gen)
    c = size // 2
    idx = torch.arange(size)
    for i in range(n):
        r, q = c + int(shift[i, 0]), c + int(shift[i, 1])
        k = int(labels[i])
        if k == 0:
            img[i, r - 1:r + 1, :] = 1.0
        elif k == 1:
            img[i, :, q - 1:q + 1] = 1.0
        elif k == 2:
            img[i, idx, (idx + r - c) % size] = 1.0
        else:
            img[i, r - 2:r + 2, q - 2:q + 2] = 1.0
    return (img + noise * torch.randn(n, size, size, generator=gen)).unsqueeze(1)


class ShapesNet(nn.Module):
    """stem (frozen 3×3 edge filters) → conv-BN-ReLU → conv(stride 2)-BN-ReLU → mean pool → dropout → linear: logits
    (B, 4)."""

    def __init__(self, channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        with torch.no_grad():  # Sobel x and y: a fixed feature, the same on every replica (built, not trained)
            sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
            self.stem.weight.copy_(torch.stack([sobel, sobel.T]).unsqueeze(1))
        self.stem.weight.requires_grad_(False)
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * channels)
        self.drop = nn.Dropout(dropout)  # draws from torch's global generator: part of a checkpoint's RNG state
        self.head = nn.Linear(2 * channels, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x, self.stem(x)], dim=1)  # (B, 3, S, S)
        x = F.relu(self.bn1(self.conv1(x)))  # (B, C, S, S)
        x = F.relu(self.bn2(self.conv2(x)))  # (B, 2C, S/2, S/2)
        return self.head(self.drop(x.mean(dim=(2, 3))))  # (B, 4)


class ShapesTask(Task):
    name = "shapes"

    def __init__(self, batch_size: int = 32, size: int = 16, noise: float = 0.5, channels: int = 8,
                 eval_size: int = 256, dtype: str = "float32", flip: bool = True, dropout: float = 0.0) -> None:
        for field, value in (("batch_size", batch_size), ("size", size), ("channels", channels),
                             ("eval_size", eval_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        if size < 8:
            raise ValueError(f"size must be at least 8, got {size}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.batch_size, self.size, self.noise, self.channels = batch_size, size, float(noise), channels
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.eval_size, self.dtype, self.flip, self.dropout = eval_size, dtype, bool(flip), float(dropout)
        self._flips = torch.Generator().manual_seed(0)  # the task's own RNG: see rng_state
        self._eval: Batch | None = None

    @property
    def fingerprint(self) -> str:
        params = {"task": "shapes-v1", "batch_size": self.batch_size, "size": self.size, "noise": self.noise,
                  "channels": self.channels, "eval_size": self.eval_size, "dtype": self.dtype, "flip": self.flip,
                  "dropout": self.dropout}
        return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size  # samples

    def build_model(self, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return ShapesNet(self.channels, self.dropout).to(_DTYPES[self.dtype])

    def _batch(self, seed: int, worker: int, num_workers: int, i: int) -> Batch:
        gen = torch.Generator().manual_seed(_seed(seed, worker, num_workers, i))
        labels = torch.randint(0, CLASSES, (self.batch_size,), generator=gen)
        return make_images(labels, self.size, self.noise, gen), labels

    def batches(self, worker: int, num_workers: int, seed: int) -> Iterator[Batch]:
        return self.batches_from(worker, num_workers, seed, 0)

    def batches_from(self, worker: int, num_workers: int, seed: int, step: int) -> Iterator[Batch]:
        """Batch ``i`` depends on (seed, worker, num_workers, i) only: seeking is free. Workers' streams are disjoint
        draws (different generator seeds) of the same distribution."""
        i = step
        while True:
            yield self._batch(seed, worker, num_workers, i)
            i += 1

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        if self.flip and model.training:
            flip = torch.rand(x.shape[0], generator=self._flips) < 0.5  # (B,) from the task's own generator
            x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
        dtype = next(model.parameters()).dtype
        return F.cross_entropy(model(x.to(dtype)).float(), y)

    def evaluate(self, model: nn.Module) -> float:
        if self._eval is None:
            gen = torch.Generator().manual_seed(_seed(9999, self.size))
            labels = torch.arange(self.eval_size) % CLASSES
            self._eval = (make_images(labels, self.size, self.noise, gen), labels)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                device = next(model.parameters()).device
                x, y = self._eval
                return float(self.loss(model, (x.to(device), y.to(device))))
        finally:
            model.train(was_training)

    def rng_state(self) -> bytes:
        return self._flips.get_state().numpy().tobytes()

    def set_rng_state(self, state: bytes) -> None:
        self._flips.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8).clone())


def shapes_task(**kwargs: Any) -> ShapesTask:
    """``--task node.tasks.examples.shapes:shapes_task``; keyword arguments are ``ShapesTask``'s."""
    return ShapesTask(**kwargs)
