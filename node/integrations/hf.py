"""A ``transformers.Trainer`` joins a lowband run with one added line (docs/api.md):

    trainer.add_callback(lowband.LowbandCallback(run="run.toml", coordinator="host:7070", workdir="./node0"))

The callback joins when training begins — with the Trainer's model, optimizer and LR scheduler, so they are checked
against the run, given the run's weights and, on a restart with the same workdir, their checkpointed state — counts
every optimizer step (``on_step_end``: every H steps the round is exchanged and the outer step written into the
model), stops the Trainer when the run's last round is applied, and leaves when training ends. Needs
``pip install lowband[hf]``.
"""
from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from node.api import Session, join
from node.round_report import RoundReport


class LowbandCallback(TrainerCallback):
    """``join_kwargs``: what ``lowband.join`` takes besides the model, optimizer and scheduler (``workdir``, ``run``,
    ``coordinator`` or ``dht``, ``token``, ``tls_ca``, ``name``, ...). ``session``: the live session while training;
    ``reports``: the reports of the rounds applied so far."""

    def __init__(self, **join_kwargs: Any) -> None:
        if "workdir" not in join_kwargs:
            raise TypeError("LowbandCallback needs workdir=... (the node's checkpoint and identity)")
        self.join_kwargs = join_kwargs
        self.session: Session | None = None
        self.reports: list[RoundReport] = []
        self._loss: float | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, optimizer: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> None:
        if model is None or optimizer is None:
            raise RuntimeError("the Trainer gave the callback no model or optimizer at on_train_begin")
        raw_optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        raw_scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
        self.session = join(model, raw_optimizer, scheduler=raw_scheduler, **self.join_kwargs)
        self.session.on_round(self.reports.append)
        if self.session.done:
            control.should_training_stop = True

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self._loss = float(logs["loss"])

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        session = self.session
        if session is None:
            return
        session.step(self._loss)
        self._loss = None
        if session.done:
            control.should_training_stop = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self.session is not None:
            self.session.close()
