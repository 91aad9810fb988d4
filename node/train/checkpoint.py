"""A worker's checkpoint: the run's state (``Reference.state``) plus everything local a restarted worker needs to go
on exactly where it stopped — the inner optimizer's state and step, the error-feedback residuals, the data position
and every RNG state (torch's CPU generator, the CUDA generator of the worker's device, the task's own). The sign
generator of ``outer.sign_mode = "randomized"`` is part of the run's state already.

Same file format as the state (node/train/state_file.py; docs/state.md), with ``kind = "checkpoint"``. Tensors
beyond the reference's: ``inner/<name>/<key>``, ``inner.extra/<key>``, ``feedback/<name>`` (fp32, the parameter's
shape), ``rng/torch``, ``rng/cuda``, ``rng/task`` (uint8). The local model is not saved: a worker restores to θ_ref,
as after any applied round (with overlap, the steps of the round in flight when it was written are not in it, and
their batches are not replayed).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from node.train import state_file
from node.train.state_file import StateFile, StateFormatError

if TYPE_CHECKING:
    from node.train.worker import Worker

log = logging.getLogger(__name__)
FILE = "checkpoint.safetensors"  # in a node's workdir
OLD_FILE = "checkpoint.pt"  # a PyTorch pickle from before this format: never loaded
MAX_TASK_RNG = 1 << 20
LOCAL = ("inner/", "inner.extra/", "feedback/", "rng/")


def snapshot(worker: "Worker", **identity: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, tensors) of ``worker`` now: copies, so training may go on while they are written. ``identity``:
    JSON-able fields that say whose checkpoint it is (the daemon's ``node`` and ``config_hash``)."""
    header, tensors = worker.reference.state()
    inner = worker.inner
    inner_header, inner_tensors = inner.save_optimizer()
    tensors |= inner_tensors
    tensors |= {f"feedback/{n}": e.detach().clone() for n, e in worker.feedback.residuals.items()}
    tensors["rng/torch"] = torch.get_rng_state()
    if worker.device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(worker.device)
    task_rng = worker.task.rng_state()
    if task_rng:
        tensors["rng/task"] = torch.frombuffer(bytearray(task_rng), dtype=torch.uint8).clone()
    header |= identity | {
        "kind": "checkpoint",
        "inner": {"optimizer": inner_header.pop("optimizer", worker.cfg.recipe.inner.optimizer), "step": inner.step,
                  "drawn": inner.drawn,
                  "shard": worker.shard, "num_shards": worker.num_shards, "skipped": inner.skipped, **inner_header},
        "feedback": {"decay": worker.cfg.recipe.feedback_decay, "names": sorted(worker.feedback.residuals)},
        "resets": worker.resets,
    }
    return header, tensors


def dumps(worker: "Worker", **identity: Any) -> bytes:
    header, tensors = snapshot(worker, **identity)
    return state_file.dumps(tensors, header)


def _int(h: dict[str, Any], key: str, where: str) -> int:
    value = h.get(key)
    if type(value) is not int or not 0 <= value < 1 << 53:
        raise StateFormatError(f"checkpoint {where}.{key} is {value!r}, not a non-negative integer")
    return value


def restore(worker: "Worker", sf: StateFile) -> None:
    """Load a parsed checkpoint into ``worker``: its reference, inner optimizer and step, residuals, data position
    (when the shard is the same; a new shard's stream starts at 0) and RNG states. Raises StateFormatError naming what
    does not fit this worker; nothing of the worker changes then (everything is checked, and the inner optimizer loaded
    into a new one, before anything is replaced)."""
    h = sf.header
    inner_h = h.get("inner")
    if not isinstance(inner_h, dict):
        raise StateFormatError("checkpoint has no 'inner' section")
    step, drawn = _int(inner_h, "step", "inner"), _int(inner_h, "drawn", "inner")
    skipped = _int(inner_h, "skipped", "inner")
    residuals: dict[str, torch.Tensor] = {}
    shapes = {n: tuple(r.shape) for n, r in zip(worker.names, worker.ref)}
    for key in sorted(state_file.keys_under(sf, "feedback/")):
        name = key[len("feedback/"):]
        if name not in shapes:
            raise StateFormatError(f"checkpoint residual {key!r} is not a tensor of this model")
        sf.expect(key, torch.float32, shapes[name])
        residuals[name] = state_file.check_finite(sf, key, sf.tensor(key))
    rng = {}
    for key, template in (("rng/torch", torch.get_rng_state()),
                          ("rng/cuda", torch.cuda.get_rng_state(worker.device) if worker.device.type == "cuda"
                           else None)):
        if key in sf.entries and template is not None:
            sf.expect(key, torch.uint8, tuple(template.shape))
            rng[key] = sf.tensor(key)
    if "rng/task" in sf.entries:
        e = sf.entries["rng/task"]
        if e.dtype != torch.uint8 or len(e.shape) != 1 or e.shape[0] > MAX_TASK_RNG:
            raise StateFormatError(f"checkpoint rng/task must be at most {MAX_TASK_RNG} uint8")
        rng["rng/task"] = sf.tensor("rng/task")
    stray = [k for k in state_file.keys_under(sf, "rng/") if k not in ("rng/torch", "rng/cuda", "rng/task")]
    if stray:
        raise StateFormatError(f"checkpoint holds unknown RNG states {stray}")
    inner = worker.inner
    put_optimizer = inner.load_optimizer(sf, inner_h)  # checked and loaded aside
    worker.reference.load_state(sf, kind="checkpoint", others=LOCAL)  # the last check; all or nothing itself
    put_optimizer()
    inner.step, inner.skipped = step, skipped
    if (inner_h.get("shard"), inner_h.get("num_shards")) == (worker.shard, worker.num_shards):
        inner.seek(drawn)
    else:
        log.info("[node=%s] the checkpoint was of shard %r/%r, this node has shard %d/%d: its data starts over",
                 worker.name, inner_h.get("shard"), inner_h.get("num_shards"), worker.shard, worker.num_shards)
        inner.seek(0)
    worker.feedback.load_state_dict(residuals)
    resets = h.get("resets", 0)
    worker.resets = resets if type(resets) is int and resets >= 0 else 0
    if "rng/torch" in rng:
        torch.set_rng_state(rng["rng/torch"])
    if "rng/cuda" in rng:
        torch.cuda.set_rng_state(rng["rng/cuda"], worker.device)
    if "rng/task" in rng:
        worker.task.set_rng_state(rng["rng/task"].numpy().tobytes())
    worker.pending = None
    worker.load_reference_into_model()


def loads(worker: "Worker", blob: bytes) -> dict[str, Any]:
    """Parse and restore a checkpoint's bytes; returns its header. Raises StateFormatError."""
    sf = state_file.parse(blob, worker.reference.max_header() * 3)
    restore(worker, sf)
    return sf.header
