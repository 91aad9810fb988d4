"""The inner loop of a node whose user's own training loop takes the steps (the Python API, node/api.py).

lowband does not draw batches, compute losses or step here: the user's optimizer steps the user's model, and the
session counts the steps (``count``) and takes the round's statistics (``take_stats``). This class gives the worker
and the checkpoint the surface ``InnerLoop`` gives them (node/train/inner.py), for the user's objects:

- ``masters`` are the model's trainable parameters themselves, whatever their dtype (the user's optimizer steps them:
  a bf16 model without fp32 master weights of the user's own loses progress below bf16's precision);
- the optimizer is the user's: a poisoned state resets it (``optimizer.state`` cleared: fresh moments, its
  hyperparameters kept); its state, its param groups' hyperparameters (lr, betas, ``initial_lr``, ...) and the
  scheduler's ``state_dict`` go into the node's checkpoint and come back on restart;
- the schedule: when the node adopts the run's state (a join, a fall-behind), the user's scheduler is stepped forward
  to the run's inner step (committed rounds × H), as the task-driven loop's schedule is; it is never stepped back;
- the payload scale of recipes that scale by η_t (``inverse_inner_lr``, ``inner_lr``) uses the lr of the user's
  optimizer's first param group at the round's end.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import nn

from node.errors import ConfigError
from node.train import state_file
from node.train.inner import InnerStats, nonfinite_state
from node.train.state_file import StateFile, StateFormatError

Scheduler = Any  # torch.optim.lr_scheduler.LRScheduler, or anything with state_dict / load_state_dict / step


def _jsonable(value: Any) -> Any:
    """``value`` as JSON (tuples as lists), or ConfigError naming what is not."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the scheduler's state_dict() must be JSON-able (numbers, strings, lists) to be "
                          f"checkpointed: {exc}") from None


class ExternalInner:
    """``model``: the user's model; ``named``: its trainable (name, parameter) pairs (lowband's view); ``optimizer``:
    the user's optimizer over (some of) the model's parameters; ``scheduler``: the user's LR scheduler, stepped once per
    inner step by the user, or None. Raises ConfigError for an optimizer holding a tensor that is not a parameter of
    the model, or a scheduler whose state cannot be checkpointed."""

    def __init__(self, model: nn.Module, named: Sequence[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
                 scheduler: Scheduler | None = None) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.masters = self.params
        self.mixed = False
        self._all_names = {id(p): n for n, p in model.named_parameters()}  # frozen ones too: any may be optimized
        stray = [tuple(p.shape) for g in optimizer.param_groups for p in g["params"] if id(p) not in self._all_names]
        if stray:
            raise ConfigError(f"the optimizer steps {len(stray)} tensor(s) that are not parameters of the model given "
                              f"to lowband (shapes {stray[:3]}): pass the model whose parameters it optimizes")
        if scheduler is not None:
            _jsonable(scheduler.state_dict())
        self.step = 0  # inner steps counted (global: the run's schedule position)
        self.drawn = 0  # lowband draws no data here
        self.skipped = 0
        self.optimizer_epoch = 0
        self._round_start = time.perf_counter()
        self._losses: list[float] = []
        self._round_steps = self._round_skipped = 0
        self._skip_cause = ""

    # -- counting the user's steps -------------------------------------------------------------------------
    def count(self, loss: float | None = None, skipped: str = "") -> None:
        """One inner step of the user's loop; ``loss`` (a float) for the round's mean; ``skipped``: why the step was
        skipped (a non-finite loss or gradient), "" when it was taken."""
        self.step += 1
        self._round_steps += 1
        if skipped:
            self.skipped += 1
            self._round_skipped += 1
            self._skip_cause = self._skip_cause or f"step {self.step - 1}: {skipped}"
        elif loss is not None and math.isfinite(loss):
            self._losses.append(float(loss))

    @property
    def round_steps(self) -> int:
        """Inner steps counted since the last ``take_stats``."""
        return self._round_steps

    def take_stats(self, tokens: int) -> InnerStats:
        """The round's statistics, and a fresh count for the next round."""
        mean = sum(self._losses) / len(self._losses) if self._losses else math.nan
        stats = InnerStats(self._round_steps, tokens, mean, self.payload_lr(), time.perf_counter() - self._round_start,
                           self._round_skipped, self._skip_cause)
        self._losses, self._round_steps, self._round_skipped, self._skip_cause = [], 0, 0, ""
        self._round_start = time.perf_counter()
        return stats

    def run(self, H: int) -> InnerStats:
        raise RuntimeError("this node's inner steps are the user's (lowband.join): there is no task loop to run")

    # -- the surface the worker and the checkpoint use -----------------------------------------------------
    def seek(self, drawn: int) -> None:
        self.drawn = drawn

    def reset_optimizer(self) -> None:
        """Fresh moments (the state cleared); hyperparameters and the scheduler are kept."""
        self.optimizer.state.clear()
        self.optimizer_epoch += 1

    def sync_model(self) -> None:
        """Nothing: the masters are the model's parameters."""

    def state_is_finite(self) -> str | None:
        return nonfinite_state(self.names, self.masters, self.optimizer)

    def payload_lr(self) -> float | None:
        lr = self.optimizer.param_groups[0].get("lr") if self.optimizer.param_groups else None
        lr = float(lr) if lr is not None else None
        return lr if lr is not None and math.isfinite(lr) and lr > 0 else None

    def follow_run(self, step: int) -> None:
        """The run's state was adopted at inner step ``step``: step the user's scheduler forward to it (never back)."""
        behind = step - self.step
        if behind > 0 and self.scheduler is not None and hasattr(self.scheduler, "step"):
            with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(behind):
                    self.scheduler.step()
        self.step = max(self.step, step)

    def param_names(self) -> dict[int, str]:
        return self._all_names

    def save_optimizer(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        header, tensors = state_file.optimizer_state(self.optimizer, self._all_names, "inner")
        header["optimizer"] = f"user:{type(self.optimizer).__name__}"
        header["scheduler"] = self.extra_state().get("scheduler")
        return header, tensors

    def load_optimizer(self, sf: StateFile, header: dict[str, Any]) -> Callable[[], None]:
        """Check the checkpoint's optimizer state, param-group hyperparameters and scheduler state against the user's
        objects; returns what loads them. Raises StateFormatError (nothing changed)."""
        loaded = state_file.read_optimizer_state(self.optimizer, self._all_names, "inner", sf, own_dtype=True)
        saved_groups = header.get("groups")
        if not isinstance(saved_groups, list) or len(saved_groups) != len(loaded["param_groups"]):
            raise StateFormatError(f"checkpoint has {len(saved_groups) if isinstance(saved_groups, list) else 'no'} "
                                   f"optimizer param groups, the optimizer has {len(loaded['param_groups'])}")
        groups = []
        for live, saved in zip(loaded["param_groups"], saved_groups):
            if not isinstance(saved, dict):
                raise StateFormatError("checkpoint optimizer param group is not an object")
            group = dict(live)
            for key, value in saved.items():
                if key in live and key != "params":
                    group[key] = tuple(value) if isinstance(live[key], tuple) and isinstance(value, list) else value
            groups.append(group)
        loaded["param_groups"] = groups
        scheduler_state = header.get("scheduler")
        if self.scheduler is not None and not isinstance(scheduler_state, dict):
            raise StateFormatError("checkpoint has no scheduler state, and this node has a scheduler")

        def commit() -> None:
            self.optimizer.load_state_dict(loaded)
            if self.scheduler is not None:
                self.load_extra_state({"scheduler": scheduler_state})
            self.optimizer_epoch += 1
        return commit

    def extra_state(self) -> dict[str, Any]:
        """The scheduler's state (JSON)."""
        return {"scheduler": _jsonable(self.scheduler.state_dict()) if self.scheduler is not None else None}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
