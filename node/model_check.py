"""Is a user's model the run's model? (the Python API, node/api.py)

The run's model is what its task builds (``[run] task`` and ``[task]`` of the run file): the coordinator holds θ_ref
for it, every node presents its digest at Join (node/train/tensors.py). A user's model must have the same parameters
(names in ``named_parameters`` order, shapes, dtypes, which of them train) and the same persistent buffers (names,
shapes, dtypes); ``check_model`` lists every difference at once instead of a bare digest mismatch at Join.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from node.train import tensors as model_tensors

MAX_LISTED = 12


class ModelMismatch(ValueError):
    """The user's model is not the run's model. ``differences``: one line per difference (also in the message)."""

    def __init__(self, task: str, differences: list[str]) -> None:
        self.differences = differences
        shown = differences[:MAX_LISTED]
        more = f"\n  ... and {len(differences) - MAX_LISTED} more" if len(differences) > MAX_LISTED else ""
        super().__init__(f"your model is not the run's model (what task {task!r} builds with the run's [task] "
                         f"parameters): {len(differences)} difference(s):\n  " + "\n  ".join(shown) + more)


def _describe(t: torch.Tensor, trains: bool | None = None) -> str:
    kind = "" if trains is None else (" trainable" if trains else " frozen")
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}{kind}"


def _tensors(model: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, torch.Tensor]]:
    params = dict(model.named_parameters())
    buffers = dict(model_tensors.buffers(model))
    return params, buffers


def _compare(kind: str, mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor],
             trains: bool) -> Iterable[str]:
    for name, t in theirs.items():
        if name not in mine:
            yield f"{kind} {name!r} ({_describe(t)}) is missing from your model"
    for name, t in mine.items():
        ref = theirs.get(name)
        if ref is None:
            yield f"{kind} {name!r} ({_describe(t)}) is in your model, not in the run's"
            continue
        if tuple(t.shape) != tuple(ref.shape):
            yield f"{kind} {name!r}: shape {list(t.shape)} in your model, {list(ref.shape)} in the run's"
        if t.dtype != ref.dtype:
            yield (f"{kind} {name!r}: dtype {str(t.dtype).removeprefix('torch.')} in your model, "
                   f"{str(ref.dtype).removeprefix('torch.')} in the run's")
        if trains and t.requires_grad != ref.requires_grad:
            yield (f"{kind} {name!r}: {'trainable' if t.requires_grad else 'frozen'} in your model, "
                   f"{'trainable' if ref.requires_grad else 'frozen'} in the run's (requires_grad)")


def check_model(model: nn.Module, reference: nn.Module, task: str) -> None:
    """Raise ``ModelMismatch`` unless ``model`` has ``reference``'s parameters and persistent buffers (names, shapes,
    dtypes, ``requires_grad``) in the same order; ConfigError (node/train/tensors.py) for a dtype lowband cannot
    train or send."""
    params, buffers = _tensors(model)
    ref_params, ref_buffers = _tensors(reference)
    diffs = list(_compare("parameter", params, ref_params, True)) + list(_compare("buffer", buffers, ref_buffers,
                                                                                  False))
    if not diffs:
        mine = [n for n, _ in model_tensors.trainable(model)]
        theirs = [n for n, _ in model_tensors.trainable(reference)]
        if mine != theirs:
            diffs.append(f"trainable parameters in another order: {mine[:4]}... in your model, {theirs[:4]}... "
                         "in the run's")
        if [n for n in buffers] != [n for n in ref_buffers]:
            diffs.append("persistent buffers in another order than the run's model")
    if diffs:
        raise ModelMismatch(task, diffs)


def copy_model(source: nn.Module, target: nn.Module) -> None:
    """Every parameter (frozen ones too) and persistent buffer of ``source`` into ``target``'s tensors in place (same
    names; ``check_model`` passed), cast to the target's device."""
    params, buffers = _tensors(source)
    mine_params, mine_buffers = _tensors(target)
    with torch.no_grad():
        for name, t in mine_params.items():
            t.copy_(params[name])
        for name, t in mine_buffers.items():
            t.copy_(buffers[name])
