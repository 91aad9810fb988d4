"""What the protocol benches (``bench coordinator``, ``bench exchange``) play instead of training nodes: a run
file whose rounds never end on their own, and one precomputed encoded update per fake node.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from node import wire
from node.compress import make_codec
from node.compress.base import Codec
from node.config import RunConfig
from node.runfile import build_run_file
from node.tasks.base import Task


def protocol_run_file(recipe: str, size: str, run_id: str = "bench-coordinator", max_nodes: int = 64,
                      result: str = "relay", aggregate_codec: str = "identity") -> str:
    """A run that waits long for every member (rounds close when all submitted), never evaluates (the measured
    latency is the protocol's) and has more rounds than any bench plays. ``max_nodes``: the members it admits (the
    coordinator sizes its RPC workers by it); ``result``/``aggregate_codec``: ``[rounds]``'s result mode."""
    result_keys = {} if result == "relay" else {"result": result, "aggregate_codec": aggregate_codec}
    return build_run_file(run_id=run_id, recipe=recipe, rounds=100_000, task_params={"size": size, "batch_size": 8},
                          recipe_overrides={"H": 16},
                          membership={"min_nodes": 1, "max_nodes": max_nodes, "heartbeat_s": 2.0, "lease_s": 60.0},
                          rounds_policy={"initial_wait_s": 120.0, "max_wait_s": 120.0, "eval_every": 0,
                                         **result_keys})


class EncodedUpdates(NamedTuple):
    codec: Codec
    spec: wire.ModelSpec
    updates: dict[str, dict[str, Any]]  # fake node name → tensor name → encoded random update
    params: int  # trainable parameter count


def encoded_updates(cfg: RunConfig, task: Task, names: list[str]) -> EncodedUpdates:
    """A random update (scale 1e-3, seeded) per name, encoded by the run's codec for the task's model."""
    model = task.build_model(cfg.seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    codec = make_codec(cfg.recipe.codec.name, cfg.recipe.codec.params)
    gen = torch.Generator().manual_seed(1)
    updates = {name: {n: codec.encode(torch.randn(p.shape, generator=gen) * 1e-3) for n, p in named} for name in names}
    return EncodedUpdates(codec, wire.model_spec(named), updates, sum(p.numel() for _, p in named))
