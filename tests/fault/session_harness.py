"""Nodes driven by a user's own training loop through the Python API (``lowband.join``), in threads of one process,
on an in-process run through the fault seam — the ``LocalCluster`` of daemon_harness.py with the daemon replaced by
the loop a user writes: their own model (built with another seed: join gives it the run's weights), AdamW, a
LambdaLR warmup stepped every inner step, ``grads_finite`` before each optimizer step, ``session.step(loss)``.

What a test reads is what the user and the operator read: the node's ``rounds.jsonl``, the reports ``step()``
returned, what the session restored on join (``joined``), and the run's reference."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import lowband
from daemon_harness import BOUND_S, LocalCluster
from node.tasks.base import build_seeded
from node.transport.faults import FaultyPlane, NodeCrashed

log = logging.getLogger(__name__)
WARMUP = 8


def warmup(step: int) -> float:
    return min(1.0, (step + 1) / WARMUP)


@dataclass
class UserNode:
    """One user's process: their objects, what they saw, how it ended."""

    name: str
    thread: threading.Thread
    stop: threading.Event
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    session: lowband.Session | None = None
    reports: list[lowband.RoundReport] = field(default_factory=list)
    joined: dict[str, Any] = field(default_factory=dict)  # what the session held right after join
    outcome: dict[str, Any] = field(default_factory=dict)  # "done", "crashed" or "error"

    def wait(self, bound_s: float = BOUND_S) -> dict[str, Any]:
        self.thread.join(bound_s)
        assert not self.thread.is_alive(), f"{self.name} still running after {bound_s:.0f} s"
        return self.outcome


def snapshot_optimizer(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Copies of the optimizer's state tensors by (param index, key), and its groups' lrs."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {(i, k): v.detach().clone() for i, p in enumerate(params) for k, v in opt.state.get(p, {}).items()
             if isinstance(v, torch.Tensor)}
    return {"state": state, "lrs": [g["lr"] for g in opt.param_groups]}


class SessionCluster(LocalCluster):
    """``start_user(name)`` runs a user's loop for ``name`` (workdir ``root/name``)."""

    def start_user(self, name: str, on_joined: Callable[[UserNode], None] | None = None, grads_check: bool = True,
                   nan_at: int | None = None, wrap: Callable[[Any], Any] | None = None, **join_kwargs: Any) -> UserNode:
        """``nan_at``: the loss of this node's inner step ``nan_at`` (0-based, counted in this loop) is NaN;
        ``grads_check``: the loop asks ``session.grads_finite`` before each optimizer step; ``wrap``: what the node's
        plane is wrapped in besides the fault seam (a hostile member's, say)."""
        stop = threading.Event()
        # not the run's seed: join writes the run's weights. build_seeded: one build at a time in the process (a build
        # seeds torch's global generator, which another thread's join is drawing the run's initial weights from)
        model = build_seeded(self.task, 1000 + len(self.nodes))
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
        plane = FaultyPlane(self.run.plane(name, stop), name, self.schedule)
        if wrap is not None:
            plane = wrap(plane)
        node = UserNode(name, threading.Thread(name=f"user-{name}", daemon=True), stop, model, optimizer, scheduler)

        def body() -> None:
            try:
                session = node.session = lowband.join(model, optimizer, scheduler=scheduler,
                                                      workdir=self.root / name, name=name, plane=plane, stop=stop,
                                                      round_timeout_s=BOUND_S, **join_kwargs)
                node.joined = {"resumed": session.resumed, "inner_step": session.inner_step,
                               "last_epoch": scheduler.last_epoch, "optimizer": snapshot_optimizer(optimizer),
                               "fingerprint": session.fingerprint}
                if on_joined is not None:
                    on_joined(node)
                shard, shards = session.shard
                batches = self.task.batches(shard, shards, self.cfg.seed)
                with session:
                    steps = 0
                    while not session.done:
                        loss = self.task.loss(model, next(batches))
                        if steps == nan_at:
                            loss = loss * float("nan")
                        steps += 1
                        loss.backward()
                        if not grads_check or session.grads_finite(loss):
                            optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        scheduler.step()
                        report = session.step(loss.detach())
                        if report is not None:
                            node.reports.append(report)
                node.outcome["done"] = True
            except NodeCrashed as exc:
                node.outcome["crashed"] = str(exc)
            except lowband.JoinRefused as exc:  # the run refused it when it joined (again)
                node.outcome["refused"] = str(exc)
            except BaseException as exc:  # a test must see it, not a silent thread death
                log.exception("%s failed", name)
                node.outcome["error"] = repr(exc)

        node.thread = threading.Thread(target=body, name=f"user-{name}", daemon=True)
        self.nodes[name] = node  # type: ignore[assignment]
        node.thread.start()
        return node

    def start_users_together(self, names: tuple[str, ...], **join_kwargs: Any) -> None:
        self.run.start_when(len(names))
        for name in names:
            self.start_user(name, **join_kwargs)

    def final_fingerprint(self, name: str) -> str:
        node = self.nodes[name]
        if isinstance(node, UserNode):
            assert node.session is not None
            return node.session.fingerprint
        return super().final_fingerprint(name)

    def checkpoint_header(self, name: str) -> dict[str, Any]:
        from node.train import state_file

        return state_file.parse((self.root / name / "checkpoint.safetensors").read_bytes()).header


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
