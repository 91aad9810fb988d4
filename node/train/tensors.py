"""Which of a model's tensors lowband trains, exchanges and saves, and the checks it runs on them at start-up.

- **Trainable parameters** (``requires_grad``; a tied parameter once, under its first name): the pseudo-gradient,
  the codec, the outer step and θ_ref cover them. Their dtype must be fp32, bf16 or fp16: anything else is refused
  at start-up naming the tensor (a codec carries fp32 values; float64 would lose precision and range in θ_ref's
  fp32, and complex or integer tensors cannot be trained).
- **Buffers** (persistent ones, those in ``state_dict``): travel dense in every frame's ``extra`` section and are
  agreed each round — floating ones averaged, integer and bool ones maxed across the round's members
  (docs/algorithms.md, §10). Non-persistent buffers (caches, masks) are rebuilt by the model and never travel.
- **Frozen parameters** (``requires_grad = False``): never exchanged; every replica builds them from the seed, and
  ``lowband export`` writes them from the model.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import torch
from torch import nn

from node import wire
from node.errors import ConfigError

TRAINABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
Named = Sequence[tuple[str, torch.Tensor]]


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter with ``requires_grad``, in ``named_parameters`` order (tied ones once).
    Raises ConfigError naming a parameter whose dtype lowband cannot train."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for name, p in named:
        if p.dtype not in TRAINABLE_DTYPES:
            raise ConfigError(f"parameter {name!r} is {p.dtype}: lowband trains float32, bfloat16 and float16 "
                              "parameters (convert the model, e.g. model.float(), or freeze the tensor)")
    return named


def buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, buffer) of every persistent buffer, in ``named_buffers`` order (shared ones once). Raises ConfigError
    naming a buffer whose dtype cannot travel (complex, float8, unsigned wider than 8 bits)."""
    out = []
    for name, buf in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if leaf in module._non_persistent_buffers_set:
            continue  # not in state_dict: rebuilt by the model itself, never saved, so never exchanged either
        if buf.dtype not in wire.CODE_OF:
            raise ConfigError(f"buffer {name!r} is {buf.dtype}: buffers travel as one of "
                              f"{sorted(str(d) for d in wire.CODE_OF)}")
        out.append((name, buf))
    return out


def buffer_spec(named: Named) -> list[wire.ExtraSpec]:
    return [wire.ExtraSpec(n, tuple(b.shape), b.dtype) for n, b in named]


def model_digest(spec: wire.ModelSpec, extra: wire.ExtraSpecs = ()) -> str:
    """Names and shapes of the trainable tensors, then names, shapes and dtypes of the buffers: two models with equal
    digests take each other's frames. A model without buffers has the digest it had before buffers travelled."""
    text = ";".join(f"{t.name}:{'x'.join(map(str, t.shape))}" for t in spec)
    if extra:
        text += "|" + ";".join(f"{e.name}:{'x'.join(map(str, e.shape))}:{wire.CODE_OF[e.dtype]}" for e in extra)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def digest_of(model: nn.Module) -> str:
    """``model_digest`` of a model (what a node presents at Join)."""
    return model_digest(wire.model_spec(trainable(model)), buffer_spec(buffers(model)))


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor | None]]) -> str | None:
    """The name of the first floating tensor holding NaN or ±inf, with which (``"'w' holds nan"``), or None. One
    device synchronisation when everything is finite (the common case); names are looked for only after a hit."""
    items = [(n, t) for n, t in named if t is not None and t.is_floating_point() and t.numel()]
    if not items:
        return None
    if bool(torch.stack([torch.isfinite(t).all() for _, t in items]).all()):
        return None
    for name, t in items:
        if not bool(torch.isfinite(t).all()):
            return f"{name!r} holds {'nan' if bool(torch.isnan(t).any()) else 'inf'}"
    return None  # unreachable: the stacked check found one


def assign(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """Copy ``src`` into ``dst`` in place, casting to each destination's dtype and device (no autograd)."""
    with torch.no_grad():
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)
