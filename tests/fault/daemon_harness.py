"""Real ``NodeDaemon``s in threads of one process, joined to one ``InProcessRun`` through the fault seam
(``FaultyPlane`` with a seeded ``FaultSchedule``). A tiny GPT keeps a round to milliseconds of CPU.

What the tests read afterwards is what an operator reads: each node's ``rounds.jsonl`` audit trail and its exit
status; and the run's own reference, which every replica must match."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from node.bench.invariants import round_sequence_problems
from node.clock import SYSTEM_CLOCK, Clock
from node.config import RunConfig, TaskConfig
from node.daemon import NodeDaemon, NodeOptions
from node.recipes import make_run_config
from node.roundlog import read_round_log
from node.tasks import load_task
from node.transport.faults import FaultSchedule, FaultyPlane, NodeCrashed
from node.transport.inprocess_plane import InProcessRun

log = logging.getLogger(__name__)
TASK = TaskConfig("gpt", {"size": "tiny", "batch_size": 2, "block_size": 16, "eval_batches": 1, "n_embd": 32,
                          "n_layer": 1, "n_head": 2})
BOUND_S = 120.0  # the most any daemon in these tests may run


def run_config(recipe: str = "sign", rounds: int = 6, **overrides: Any) -> RunConfig:
    return make_run_config(recipe, {"H": 2, "inner.lr": 2e-3, **overrides}, task=TASK, rounds=rounds,
                           run_id=f"fault-{recipe}")


def wait_for(condition: Callable[[], bool], bound_s: float = BOUND_S, poll_s: float = 0.01) -> None:
    """Poll ``condition`` until it holds (a bounded wait for a state, not a sleep standing in for one)."""
    stop = threading.Event()
    for _ in range(int(bound_s / poll_s)):
        if condition():
            return
        stop.wait(poll_s)
    raise AssertionError(f"condition not reached within {bound_s:.0f} s")


@dataclass
class Node:
    name: str
    daemon: NodeDaemon
    thread: threading.Thread
    stop: threading.Event
    outcome: dict[str, Any] = field(default_factory=dict)  # "code" or "crashed" or "error"

    def wait(self, bound_s: float = BOUND_S) -> dict[str, Any]:
        self.thread.join(bound_s)
        assert not self.thread.is_alive(), f"{self.name} still running after {bound_s:.0f} s"
        return self.outcome


class LocalCluster:
    """An in-process run; ``start(name)`` runs a daemon for ``name`` with workdir ``root/name``."""

    def __init__(self, root: Path, cfg: RunConfig, schedule: FaultSchedule | None = None, min_nodes: int = 1,
                 round_wait_s: float = float("inf")) -> None:
        self.root, self.cfg = root, cfg
        self.task = load_task(cfg.task.name, **cfg.task.params)
        self.run = InProcessRun(cfg, self.task, min_nodes=min_nodes, round_wait_s=round_wait_s)
        self.schedule = schedule or FaultSchedule()
        self.nodes: dict[str, Node] = {}

    def start(self, name: str, clock: Clock = SYSTEM_CLOCK, wrap: Callable[[Any], Any] | None = None,
              **opts: Any) -> Node:
        """``wrap``: what the node's plane is wrapped in besides the fault seam (a hostile member's, say)."""
        stop = threading.Event()
        plane = FaultyPlane(self.run.plane(name, stop), name, self.schedule)
        if wrap is not None:
            plane = wrap(plane)
        options = NodeOptions(coordinator="", workdir=self.root / name, name=name, device="cpu",
                              round_timeout_s=BOUND_S, **opts)
        daemon = NodeDaemon(options, stop, plane=plane, clock=clock)
        outcome: dict[str, Any] = {}

        def body() -> None:
            try:
                outcome["code"] = daemon.run()
            except NodeCrashed as exc:
                outcome["crashed"] = str(exc)
            except BaseException as exc:  # a test must see it, not a silent thread death
                log.exception("%s failed", name)
                outcome["error"] = repr(exc)

        thread = threading.Thread(target=body, name=f"daemon-{name}", daemon=True)
        node = self.nodes[name] = Node(name, daemon, thread, stop, outcome)
        thread.start()
        return node

    def start_together(self, names: tuple[str, ...]) -> None:
        """Start ``names``; the run starts once every one of them joined (otherwise the first ``min_nodes`` to join
        start it and the others join it under way)."""
        self.run.start_when(len(names))
        for name in names:
            self.start(name)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def wait_all(self) -> dict[str, dict[str, Any]]:
        return {n: node.wait() for n, node in self.nodes.items()}

    def stop_all(self) -> None:
        for node in self.nodes.values():
            node.stop.set()
        for node in self.nodes.values():
            node.thread.join(BOUND_S)

    def log(self, name: str) -> list[dict[str, Any]]:
        return read_round_log(self.root / name)

    def applied(self, name: str) -> dict[int, dict[str, Any]]:
        """Round → the entry of the round ``name`` applied (every round at most once: checked)."""
        entries = self.log(name)
        problems = round_sequence_problems(entries, name)
        assert not problems, problems
        return {e["round"]: e for e in entries if "round" in e}

    def final_fingerprint(self, name: str) -> str:
        worker = self.nodes[name].daemon.worker
        assert worker is not None
        return worker.fingerprint()
