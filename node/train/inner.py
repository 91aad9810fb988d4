"""The inner loop: H local steps of any torch optimizer on this worker's batches.

Inner optimizer state (AdamW moments) is local and persists across rounds; it is never exchanged.
bf16 autocast is used on CUDA.

Mixed precision: the inner optimizer steps **fp32 master copies** of the trainable parameters (``masters``); a
bf16/fp16 model holds their rounded copy for its forward and backward, and its gradients are taken into the masters
in fp32 each step. Local progress therefore accumulates in fp32, and a worker that makes none holds θ_ref exactly,
so its Δ = θ_ref − master is exactly 0 whatever the model's dtype. For an fp32 model the masters *are* the
parameters (no copy, the arithmetic of a plain loop).

Non-finite steps: a step whose loss or gradient holds NaN or ±inf (or whose gradient norm overflows fp32) is
skipped, as ``torch.amp.GradScaler`` skips one: no optimizer step, no moment update, the gradient dropped, the
model's buffers (moved by its forward) put back; the batch counts as drawn and the schedule moves on.
Skips are counted (``InnerStats.skipped``, ``InnerLoop.skipped``) and the first of each round is logged with its
cause. In ``grad`` mode a skipped step leaves no gradient: the round's payload is 0.

Data position: ``drawn`` counts the batches taken from the task's stream; ``seek`` reopens the stream there
(``Task.batches_from``), so a worker restored from a checkpoint continues with the batch it would have used.

The surface the worker, the checkpoint and a multi-process node use (``step``, ``drawn``, ``skipped``, ``masters``,
``optimizer``, ``optimizer_epoch``, ``seek``, ``reset_optimizer``, ``sync_model``, ``state_is_finite``,
``follow_run``, ``payload_lr``, ``save_optimizer``/``load_optimizer``, ``extra_state``/``load_extra_state``) is shared
with ``ExternalInner`` (node/train/external.py), the inner loop of a node whose user's own loop takes the steps.

A multi-process node (node/train/local_group.py) sets ``wrap`` (the forward and backward then run through the DDP
module it returns, built at the first step) and ``agree`` (one skip decision for every local rank).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from node.config import InnerConfig
from node.tasks.base import Batch, Task
from node.train import state_file
from node.train.schedule import inner_lr, warmup_steps
from node.train.state_file import StateFile, StateFormatError
from node.train.tensors import first_nonfinite

log = logging.getLogger(__name__)


@dataclass
class InnerStats:
    steps: int
    tokens: int
    mean_loss: float  # over the steps taken (NaN when every step was skipped)
    last_lr: float  # η_t: the inner lr of the round's last step
    compute_s: float
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    skip_cause: str = ""  # the first skip's cause, e.g. "step 17: loss is nan"


def make_inner_optimizer(cfg: InnerConfig, model: nn.Module | Iterable[torch.Tensor],
                         names: Sequence[str] | None = None) -> torch.optim.Optimizer | None:
    """AdamW with decay on ≥2-D tensors only; SGD; Muon on the hidden matrices with AdamW on the rest (``muon``,
    node/train/muon.py: it tells them apart by ``names``); or None for ``grad`` (no local step). ``model``: a module
    (its trainable parameters) or the tensors to optimize (the fp32 masters, named by ``names``)."""
    if isinstance(model, nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    else:
        tensors = list(model)
        named = list(zip(names if names is not None else [f"p{i}" for i in range(len(tensors))], tensors))
    params = [p for _, p in named]
    if cfg.optimizer == "grad":
        return None
    if cfg.optimizer == "muon":
        from node.train.muon import MuonAdamW

        return MuonAdamW(named, cfg.lr, cfg.betas, cfg.weight_decay)
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    return torch.optim.SGD(groups, lr=cfg.lr)


class InnerLoop:
    """Runs H inner steps; in ``grad`` mode it accumulates one gradient and leaves parameters alone.

    ``named``: the trainable parameters (name, tensor); ``stream(start)``: the worker's batches from its
    ``start``-th (``Task.batches_from``); ``buffers``: the model's persistent buffers, put back after a skipped
    step. The masters live on the parameters' device."""

    def __init__(self, cfg: InnerConfig, task: Task, model: nn.Module, named: Sequence[tuple[str, torch.Tensor]],
                 stream: Callable[[int], Iterator[Batch]], total_steps: int, device: torch.device,
                 buffers: Sequence[torch.Tensor] = ()) -> None:
        self.cfg, self.task, self.model = cfg, task, model
        self.total_steps, self.device = total_steps, device
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        # fp32 masters: the parameters themselves when already fp32, else fp32 copies the optimizer steps
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().clone() for p in self.params]
        self.mixed = any(m is not p for m, p in zip(self.masters, self.params))
        self.buffers = list(buffers)  # put back after a skipped step (its forward moved them)
        self.optimizer = make_inner_optimizer(cfg, self.masters, self.names)
        self._stream = stream
        self.batches = stream(0)
        self.step = 0  # global inner step count, drives the schedule
        self.drawn = 0  # batches taken from the stream: the data position
        self.skipped = 0  # non-finite steps skipped, over the worker's life
        self.optimizer_epoch = 0  # bumped whenever the optimizer state is replaced (reset, checkpoint restore)
        self.replicas = 1  # local processes training this replica together (tokens per step)
        self.wrap: Callable[[nn.Module], nn.Module] | None = None  # DDP, for a multi-process node
        self.agree: Callable[[str | None], str | None] | None = None  # one skip decision across local processes
        self._forward: nn.Module | None = None

    def lr_at(self, step: int) -> float:
        c = self.cfg
        return inner_lr(step, c.lr, warmup_steps(c.warmup_steps, self.total_steps), self.total_steps, c.min_lr_ratio)

    def seek(self, drawn: int) -> None:
        """Reopen the stream at batch ``drawn`` (0-based), as if that many had been taken."""
        self.batches = self._stream(drawn)
        self.drawn = drawn

    def reset_optimizer(self) -> None:
        """Fresh optimizer state (moments), e.g. after they were poisoned."""
        self.optimizer = make_inner_optimizer(self.cfg, self.masters, self.names)
        self.optimizer_epoch += 1

    def follow_run(self, step: int) -> None:
        """The run's state was adopted at global inner step ``step``: the schedule follows the run."""
        self.step = step

    def payload_lr(self) -> float | None:
        """η_t for the round's payload scale; None: the run's schedule at the round (``Reference.inner_lr``)."""
        return None

    def param_names(self) -> dict[int, str]:
        """id(tensor) → name of every tensor the optimizer steps."""
        return {id(m): n for n, m in zip(self.names, self.masters)}

    def save_optimizer(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(checkpoint header part, tensors) of the optimizer state (docs/state.md, ``inner``)."""
        if self.optimizer is None:
            return {"groups": [], "extra": []}, {}
        return state_file.optimizer_state(self.optimizer, self.param_names(), "inner")

    def load_optimizer(self, sf: StateFile, header: dict[str, Any]) -> Callable[[], None]:
        """Check a checkpoint's optimizer state against this loop and load it into a new optimizer, aside; returns
        what puts it in place. Raises StateFormatError (nothing changed)."""
        optimizer = make_inner_optimizer(self.cfg, self.masters, self.names)
        if optimizer is not None:
            state_file.load_optimizer_state(optimizer, self.param_names(), "inner", sf)
        elif state_file.keys_under(sf, "inner"):
            raise StateFormatError("checkpoint holds inner optimizer state but this recipe takes no inner step")

        def commit() -> None:
            self.optimizer = optimizer
            self.optimizer_epoch += 1
        return commit

    def extra_state(self) -> dict[str, Any]:
        """JSON-able local state beyond the optimizer's tensors (none here; the user's scheduler in ExternalInner)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Inverse of ``extra_state``."""

    def sync_model(self) -> None:
        """Copy the masters into a mixed-precision model's parameters (rounding to its dtype)."""
        if self.mixed:
            with torch.no_grad():
                for p, m in zip(self.params, self.masters):
                    if p is not m:
                        p.copy_(m)

    def _grads(self) -> list[torch.Tensor | None]:
        """The step's gradients on the masters (fp32), taken from a mixed model's parameters."""
        if self.mixed:
            for p, m in zip(self.params, self.masters):
                if m is not p:
                    m.grad = None if p.grad is None else p.grad.detach().float()
        return [m.grad for m in self.masters]

    def _nonfinite(self, loss: torch.Tensor, grads: list[torch.Tensor | None]) -> tuple[str | None, torch.Tensor]:
        """(cause or None, total gradient norm): one synchronisation when everything is finite."""
        present = [g for g in grads if g is not None]
        norm = torch.nn.utils.get_total_norm(present, 2.0) if present else torch.zeros((), device=loss.device)
        if bool(torch.isfinite(loss.detach()).all() & torch.isfinite(norm)):
            return None, norm
        if not bool(torch.isfinite(loss.detach()).all()):
            return f"loss is {float(loss.detach().float().reshape(-1)[0])}", norm
        bad = first_nonfinite(zip(self.names, grads))
        return (f"gradient {bad}" if bad else "gradient norm overflows fp32 (finite gradients above ~1e19)"), norm

    def _skip(self, snapshot: list[torch.Tensor]) -> None:
        self.model.zero_grad(set_to_none=True)
        for m in self.masters:
            m.grad = None
        with torch.no_grad():
            for b, s in zip(self.buffers, snapshot):
                b.copy_(s)  # the forward already moved running statistics with this batch
        self.skipped += 1

    def run(self, H: int) -> InnerStats:
        start = time.perf_counter()
        self.model.train()
        if self._forward is None:
            self._forward = self.model if self.wrap is None else self.wrap(self.model)
        forward = self._forward
        losses, skipped, cause = [], 0, ""
        lr = self.lr_at(self.step)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        for _ in range(H):
            lr = self.lr_at(self.step)
            x, y = next(self.batches)
            self.drawn += 1
            batch = (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
            snapshot = [b.detach().clone() for b in self.buffers]
            with autocast:
                loss = self.task.loss(forward, batch)
            self.model.zero_grad(set_to_none=True)
            loss.backward()
            grads = self._grads()
            problem, norm = self._nonfinite(loss, grads)
            if self.agree is not None:
                problem = self.agree(problem)
            if problem is not None:
                self._skip(snapshot)
                if not skipped:
                    cause = f"step {self.step}: {problem}"
                    log.warning("inner step %d skipped: %s (the optimizer, its moments and the buffers are "
                                "untouched)", self.step, problem)
                skipped += 1
                self.step += 1
                continue
            if self.cfg.grad_clip is not None:
                torch.nn.utils.clip_grads_with_norm_(self.masters, self.cfg.grad_clip, norm)
            if self.optimizer is not None:
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.optimizer.step()
                self.sync_model()
            losses.append(loss.detach())
            self.step += 1
        mean_loss = float(torch.stack(losses).float().mean()) if losses else float("nan")
        return InnerStats(H, H * self.task.tokens_per_batch * self.replicas, mean_loss, lr, time.perf_counter() - start, skipped,
                          cause)

    def state_is_finite(self) -> str | None:
        """None, or which master or optimizer moment holds a non-finite value."""
        return nonfinite_state(self.names, self.masters, self.optimizer)


def nonfinite_state(names: Sequence[str], masters: Sequence[torch.Tensor],
                    optimizer: torch.optim.Optimizer | None) -> str | None:
    """None, or which of ``masters`` or which tensor of the optimizer's state holds a non-finite value."""
    named: list[tuple[str, torch.Tensor | None]] = list(zip(names, masters))
    if optimizer is not None:
        by_id = {id(m): n for n, m in zip(names, masters)}
        for p, state in optimizer.state.items():
            named += [(f"{by_id.get(id(p), '?')}.{k}", v) for k, v in state.items() if isinstance(v, torch.Tensor)]
    return first_nonfinite(named)
