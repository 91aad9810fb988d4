"""``lowband export``: the run's reference as a plain safetensors ``state_dict`` of the task's model.

The output loads with ``model.load_state_dict(safetensors.torch.load_file(path))`` into the model the task builds
(``task.build_model(seed)``): every key of the model's ``state_dict`` — θ_ref for the trainable parameters, the
agreed buffers, frozen parameters as the seed built them; a tied tensor is written under each of its names (as
separate copies: safetensors holds no shared storage), each in the model's own dtype. Its ``__metadata__`` says
where it came from (``lowband``: run id, recipe, committed rounds, fingerprint).

The source is a node's checkpoint (``--workdir``) or a coordinator's last committed state (``--state-dir``). Both
carry the run's configuration in their header, so the task is found and built as the run did — its module must be
importable here (``--task-path`` or PYTHONPATH, docs/tasks.md).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_tensors

from node.config import run_config_from_dict
from node.fsutil import write_atomic
from node.tasks import load_task
from node.tasks.base import build_seeded
from node.train import state_file, tensors as model_tensors
from node.train.checkpoint import FILE, LOCAL, OLD_FILE
from node.train.reference import Reference
from node.train.state_file import StateFormatError

MAX_HEADER = 64 << 20


def model_from_state(blob: bytes) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The task's model holding the reference of a state or checkpoint file, and the file's header. Raises
    StateFormatError (a ValueError) for anything but a lowband state or checkpoint of a model the task builds."""
    sf = state_file.parse(blob, MAX_HEADER)
    kind = sf.header.get("kind")
    if kind not in ("reference", "checkpoint"):
        raise StateFormatError(f"a lowband file of kind {kind!r}: export reads a state or a checkpoint")
    try:
        cfg = run_config_from_dict(sf.header["run"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StateFormatError(f"the file's run configuration is unreadable: {exc}") from None
    task = load_task(cfg.task.name, **cfg.task.params)
    model = build_seeded(task, cfg.seed)
    reference = Reference.for_model(cfg, model)
    reference.load_state(sf, kind=kind, others=LOCAL if kind == "checkpoint" else ())
    model_tensors.assign([p for _, p in model_tensors.trainable(model)], reference.tensors)
    model_tensors.assign([b for _, b in model_tensors.buffers(model)], reference.buffers)
    return model, sf.header


def export_bytes(blob: bytes) -> bytes:
    """A state or checkpoint file → the model's ``state_dict`` as safetensors bytes."""
    model, header = model_from_state(blob)
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    meta = {"run_id": header["run"]["run_id"], "recipe": header["run"]["recipe"]["name"],
            "committed_rounds": header["committed_rounds"], "fingerprint": header["fingerprint"]}
    return save_tensors(tensors, metadata={"lowband": json.dumps(meta, sort_keys=True)})


def export(source: bytes, out: Path) -> dict[str, Any]:
    """Write the export of ``source`` (state or checkpoint bytes) to ``out`` atomically; returns its metadata."""
    data = export_bytes(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, data)
    header = state_file.parse(source, MAX_HEADER).header
    return {"out": str(out), "bytes": len(data), "committed_rounds": header["committed_rounds"],
            "fingerprint": header["fingerprint"], "run_id": header["run"]["run_id"]}


def checkpoint_bytes(workdir: Path) -> bytes:
    """The checkpoint of a node's workdir; FileNotFoundError naming what is missing."""
    path = workdir / FILE
    if not path.is_file():
        old = f" ({OLD_FILE} is from an older lowband and cannot be read)" if (workdir / OLD_FILE).exists() else ""
        raise FileNotFoundError(f"no {FILE} in {workdir}{old}")
    return path.read_bytes()
