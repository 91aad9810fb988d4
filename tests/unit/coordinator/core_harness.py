"""Shared by the CoordinatorCore test modules (test_core_membership.py, test_core_rounds.py,
test_core_restart.py): the core driven directly (no network) with a fake clock. Frames are real: built by
node.train.worker.Worker or node.wire.pack. Each of those modules imports the two module-scoped autouse fixtures
below, so they apply to each of them (and to no other module); the per-test fixtures ``clock``, ``make`` and
``h`` live in this directory's conftest.py."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from node.identity import NodeKey
from node.runfile import parse_run_file
from coordinator.core import PROTOCOL_VERSION, Chunk, CoordinatorCore
from coordinator.store import Disk, Store
from node import wire
from node.train.worker import Worker
from node.transport.grpc_auth import join_message


BASE: dict[str, dict[str, Any]] = {
    "run": {"id": "core-test", "task": "gpt", "recipe": "sign", "rounds": 10, "seed": 0},
    "task": {"size": "tiny", "batch_size": 2, "block_size": 32, "eval_batches": 1},
    "recipe": {"H": 1},
    "membership": {"min_nodes": 2, "max_nodes": 4, "heartbeat_s": 2.0, "lease_s": 10.0},
    "rounds": {"initial_wait_s": 5.0, "min_wait_s": 1.0, "max_wait_s": 60.0, "quantile": 1.0, "margin": 2.0,
               "eval_every": 0},
}
T0 = 100.0


def run_text(overrides: dict[str, dict[str, Any]] | None = None) -> str:
    lines = []
    for section, values in BASE.items():
        merged = {**values, **(overrides or {}).get(section, {})}
        lines.append(f"[{section}]")
        lines.extend(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in merged.items())
    return "\n".join(lines) + "\n"


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


WALL0 = 1.7e9  # the harness's unix time (the core checks signed timestamps against it)


class Harness:
    """One coordinator core over a state dir, plus helpers that act as its members (each name has a node key)."""

    def __init__(self, state_dir: Path, clock: Clock, overrides: dict[str, dict[str, Any]] | None = None,
                 disk: Disk | None = None) -> None:
        self.clock = clock
        self.cfg = parse_run_file(run_text(overrides))
        self.store = Store(state_dir, disk=disk)
        try:
            self.core = CoordinatorCore(self.cfg, self.store, clock=clock, wall=self.wall)
        except BaseException:
            self.store.close()
            raise
        self.info = self.core.run_info(PROTOCOL_VERSION, self.cfg.membership.join_token)
        self.ids: dict[str, str] = {}
        self.joins = 0
        self.keys: dict[str, NodeKey] = {}
        self.gen = torch.Generator().manual_seed(1234)

    def wall(self) -> float:
        return WALL0 + self.clock.t

    def key(self, name: str) -> NodeKey:
        return self.keys.setdefault(name, NodeKey.generate())

    def join(self, name: str, key: NodeKey | None = None, **kw: Any) -> dict[str, Any]:
        """Join as ``name`` with its key (or ``key``), signed now; ``kw`` overrides any argument of core.join."""
        key = key or self.key(name)
        self.joins += 1
        ts = int(self.wall() * 1000) + self.joins  # distinct: the same signed message twice is a replay
        args: dict[str, Any] = dict(name=name, protocol_version=PROTOCOL_VERSION, config_json=self.info["config_json"],
                                    config_hash=self.info["config_hash"],
                                    task_fingerprint=self.info["task_fingerprint"],
                                    digest=self.info["model_digest"], capabilities=("device=cpu",), join_token="",
                                    public_key=key.public, timestamp_ms=ts,
                                    signature=key.sign(join_message(self.cfg.run.run_id, name, key.public, ts)))
        args.update(kw)
        out = self.core.join(**args)
        self.ids[name] = out["node_id"]
        return out

    def frame(self, sender: str, round_: int, run: str | None = None) -> bytes:
        """A random frame of ``sender``'s, signed with its key (the coordinator verifies it against the key it
        joined with)."""
        ref = self.core.reference
        enc = {s.name: ref.codec.encode(torch.randn(s.shape, generator=self.gen)) for s in ref.spec}
        return wire.pack(run or self.cfg.run.run_id, round_, sender, ref.codec, ref.spec, enc, key=self.key(sender))

    def chunks(self, name: str, round_: int, data: bytes, offset: int = 0, total: int | None = None,
               piece: int = 1 << 20, loss: float = 2.0) -> list[Chunk]:
        total = len(data) if total is None else total
        nid = self.ids.get(name, name)
        return [Chunk(nid, round_, off, total, data[off - offset:off - offset + piece], loss)
                for off in range(offset, offset + max(len(data), 1), piece)]

    def submit(self, name: str, round_: int, frame: bytes | None = None, **kw: Any) -> dict[str, Any]:
        data = self.frame(name, round_) if frame is None else frame
        return self.core.submit(iter(self.chunks(name, round_, data, **kw)))

    def worker(self, name: str, join: dict[str, Any]) -> Worker:
        return Worker(name, self.cfg.run, self.core.task, join["shard"], join["num_shards"], key=self.key(name))

    def close(self) -> None:
        self.core.close()
        self.store.close()
