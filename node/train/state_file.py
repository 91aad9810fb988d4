"""The state format: a safetensors file whose ``__metadata__`` holds one key, ``"lowband"``, a JSON header.

Used for the run's state (``Reference.to_bytes``: θ_ref, buffers, outer optimizer state, what a joiner downloads and
the coordinator persists) and for a node's checkpoint (the same plus the inner optimizer, error feedback, data
position and RNG states). Any safetensors reader in any language reads the tensors; the JSON header says what they
are. The layout, every key and the validation rules: docs/state.md.

Reading is for files from outside (a state blob comes from the network): ``parse`` bounds and checks the whole
safetensors header — size, JSON, every entry's dtype, shape and byte range, the ranges tiling the data exactly —
before a single tensor is allocated; the caller then checks names, shapes and dtypes against its model, and
``StateFile.tensor`` allocates only entries it asked for. Anything else — a PyTorch pickle or zip archive
(``torch.save``), another safetensors file, a truncated one — is refused with a ``StateFormatError`` that says what
it is.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from safetensors.torch import save as _save

from node import wire

FORMAT = "lowband-state"
VERSION = 1
META_KEY = "lowband"
MAX_DIMS = 8
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # an optimizer state key (exp_avg, momentum_buffer, step)
MAX_STATE_KEYS = 8  # per parameter, in an optimizer's state: AdamW has 3, amsgrad 4


class StateFormatError(ValueError):
    """The bytes are not a lowband state (or checkpoint) this model can take; the message says why."""


@dataclass(frozen=True)
class Entry:
    """One tensor of the file, checked but not yet read: dtype, shape, byte range in the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass
class StateFile:
    header: dict[str, Any]  # the lowband JSON header (``format`` and ``version`` already checked)
    entries: dict[str, Entry]
    data: memoryview  # the data section: entry offsets are relative to it

    def tensor(self, key: str) -> torch.Tensor:
        """Allocate one entry (a copy, so the blob can go). KeyError for an unknown key."""
        e = self.entries[key]
        if e.end == e.start:
            return torch.empty(e.shape, dtype=e.dtype)
        return torch.frombuffer(bytearray(self.data[e.start:e.end]), dtype=e.dtype).reshape(e.shape)

    def expect(self, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        """Raise StateFormatError unless ``key`` is present with exactly this dtype and shape."""
        e = self.entries.get(key)
        if e is None:
            raise StateFormatError(f"state has no tensor {key!r}")
        if e.dtype != dtype or e.shape != tuple(shape):
            raise StateFormatError(f"state tensor {key!r} is {e.dtype} {list(e.shape)}, expected {dtype} {list(shape)}")


def _digest(items: list[tuple[str, bytes | memoryview]]) -> str:
    """sha256 over (name, NUL, bytes, NUL) of every tensor in name order: the header's ``tensors_sha256``."""
    h = hashlib.sha256()
    for key, raw in sorted(items, key=lambda kv: kv[0]):
        h.update(key.encode() + b"\0")
        h.update(raw)
        h.update(b"\0")
    return h.hexdigest()


def _raw(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def dumps(tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any]) -> bytes:
    """Tensors (any device; copied to CPU, contiguous) and a JSON-able header → the file's bytes. The header gains
    ``tensors_sha256`` (every tensor's bytes, checked by ``parse``: a torn or flipped byte anywhere is refused). Raises
    ValueError for a header JSON cannot carry exactly (NaN, ±inf)."""
    flat = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    digest = _digest([(k, _raw(t)) for k, t in flat.items()])
    meta = json.dumps({"format": FORMAT, "version": VERSION, **header, "tensors_sha256": digest}, sort_keys=True,
                      separators=(",", ":"), allow_nan=False)
    return _save(flat, metadata={META_KEY: meta})


def _fail(message: str) -> None:
    raise StateFormatError(message)


def _what_is_it(blob: bytes) -> str:
    """A name for bytes that are not a safetensors file, for the refusal message."""
    if blob[:2] == b"PK":
        return "a zip archive (PyTorch's torch.save format, with a pickle inside)"
    if blob[:1] == b"\x80":
        return "a Python pickle"
    return f"not a safetensors file (starts {blob[:8].hex()})"


def parse(blob: bytes | bytearray | memoryview, max_header: int = 16 << 20) -> StateFile:
    """Check the file's structure and its lowband header; allocates no tensor. Raises StateFormatError."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        _fail(f"state must be bytes, got {type(blob).__name__}")
    view = memoryview(blob).cast("B")
    if len(view) < 8:
        _fail(f"state is {len(view)} bytes: too short for a safetensors header")
    n = int.from_bytes(view[:8], "little")
    if n < 2 or n > max_header or 8 + n > len(view):
        _fail(f"state is {_what_is_it(bytes(view[:8]))}: lowband reads only its safetensors state format "
              "(docs/state.md); a state or checkpoint from an older lowband must be fetched or written again")
    try:
        header = json.loads(bytes(view[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise StateFormatError(f"state header is not JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict):
        _fail("state header must be a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not isinstance(meta.get(META_KEY), str):
        _fail(f"a safetensors file without lowband's header (__metadata__[{META_KEY!r}]): not a lowband state")
    try:
        ours = json.loads(meta[META_KEY])
    except (ValueError, RecursionError) as exc:
        raise StateFormatError(f"lowband header is not JSON: {exc}") from None
    if not isinstance(ours, dict) or ours.get("format") != FORMAT:
        _fail(f"lowband header must be an object with format {FORMAT!r}")
    if ours.get("version") != VERSION or type(ours.get("version")) is not int:
        _fail(f"state format version {ours.get('version')!r} is not supported (this lowband reads {VERSION})")
    data = view[8 + n:]
    entries = {key: _entry(key, info, len(data)) for key, info in header.items()}
    _check_tiling(entries, len(data))
    if ours.get("tensors_sha256") != _digest([(k, data[e.start:e.end]) for k, e in entries.items()]):
        _fail("state tensors do not match the header's tensors_sha256 (truncated or corrupted)")
    return StateFile(ours, entries, data)


def _entry(key: Any, info: Any, size: int) -> Entry:
    if not isinstance(key, str) or not 0 < len(key) <= 1024:
        _fail("state tensor names must be strings of 1–1024 characters")
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        _fail(f"state tensor {key!r}: expected exactly dtype, shape and data_offsets")
    dtype = wire.DTYPE_CODES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        _fail(f"state tensor {key!r} has dtype {info['dtype']!r}; allowed: {sorted(wire.DTYPE_CODES)}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
            and all(type(d) is int and 0 <= d < 1 << 40 for d in shape)):
        _fail(f"state tensor {key!r} has shape {shape!r}: at most {MAX_DIMS} non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= size):
        _fail(f"state tensor {key!r} has data offsets {offsets!r} outside the {size}-byte data section")
    if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
        _fail(f"state tensor {key!r}: {offsets[1] - offsets[0]} bytes for {dtype} {shape}")
    return Entry(dtype, tuple(shape), offsets[0], offsets[1])


def _check_tiling(entries: Mapping[str, Entry], size: int) -> None:
    """The entries' byte ranges cover the data section exactly, without overlaps or holes (safetensors' rule)."""
    at = 0
    for e in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if e.start != at:
            _fail(f"state data section has {'an overlap' if e.start < at else 'a hole'} at byte {min(at, e.start)}")
        at = e.end
    if at != size:
        _fail(f"state data section is {size} bytes but its tensors cover {at}")


def check_finite(sf: StateFile, key: str, value: torch.Tensor) -> torch.Tensor:
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        _fail(f"state tensor {key!r} holds non-finite values")
    return value


def keys_under(sf: StateFile, prefix: str) -> set[str]:
    return {k for k in sf.entries if k.startswith(prefix)}


# -- optimizer state ------------------------------------------------------------------------------------------

def _json_groups(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's hyperparameters (not its tensors): informational, for readers of the header. Loading takes
    them from the run's configuration instead (a config hash makes them equal)."""
    out = []
    for g in opt.state_dict()["param_groups"]:
        out.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()
                    if k != "params" and (v is None or isinstance(v, (bool, int, float, str, tuple, list)))
                    and not (isinstance(v, float) and not math.isfinite(v))})
    return out


def _ordered_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters in the order of torch's state_dict indices (group by group)."""
    return [p for g in opt.param_groups for p in g["params"]]


def optimizer_state(opt: torch.optim.Optimizer, names: Mapping[int, str], prefix: str, copy: bool = True
                    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``opt``'s state as (header part, tensors): ``{prefix}/{param name}/{key}`` per state tensor, and
    ``{prefix}.extra/{key}`` per extra top-level tensor of its ``state_dict`` (SignMomentum's generator). ``names``:
    id(parameter) → name. ``copy=False``: the optimizer's own state tensors, not copies. Raises ValueError for state
    this format cannot hold (a non-tensor value)."""
    sd = opt.state_dict()
    order = _ordered_params(opt)
    tensors: dict[str, torch.Tensor] = {}
    for idx, state in sd["state"].items():
        name = names[id(order[idx])]
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{prefix} state {key!r} of {name!r} is a {type(value).__name__}, not a tensor")
            tensors[f"{prefix}/{name}/{key}"] = value.detach().clone() if copy else value.detach()
    extra = sorted(k for k in sd if k not in ("state", "param_groups") and isinstance(sd[k], torch.Tensor))
    for key in extra:
        tensors[f"{prefix}.extra/{key}"] = sd[key].detach().clone() if copy else sd[key].detach()
    return {"groups": _json_groups(opt), "extra": extra}, tensors


def load_optimizer_state(opt: torch.optim.Optimizer, names: Mapping[int, str], prefix: str, sf: StateFile) -> None:
    """Inverse of ``optimizer_state``, from a file checked by ``parse``: every ``{prefix}/`` entry must name a
    parameter of ``opt`` and hold fp32 of its shape (or a scalar, e.g. AdamW's step), finite, at most
    ``MAX_STATE_KEYS`` per parameter; extras must match the live optimizer's in dtype and shape. Raises
    StateFormatError; ``opt`` is unchanged then."""
    opt.load_state_dict(read_optimizer_state(opt, names, prefix, sf))


def read_optimizer_state(opt: torch.optim.Optimizer, names: Mapping[int, str], prefix: str, sf: StateFile,
                         own_dtype: bool = False) -> dict[str, Any]:
    """The checks of ``load_optimizer_state``; returns the ``state_dict`` to load (``opt`` is not touched; its live
    param groups in it). ``own_dtype``: state may also be in its parameter's dtype (a user's optimizer over a bf16
    model keeps bf16 moments)."""
    order = _ordered_params(opt)
    index = {names[id(p)]: (i, p) for i, p in enumerate(order)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key in sorted(keys_under(sf, prefix + "/")):
        name, _, leaf = key[len(prefix) + 1:].rpartition("/")
        if name not in index or not _KEY_RE.fullmatch(leaf):
            _fail(f"state tensor {key!r} is not optimizer state of a parameter of this model")
        i, p = index[name]
        e = sf.entries[key]
        dtypes = (torch.float32, p.dtype) if own_dtype else (torch.float32,)
        if e.dtype not in dtypes or e.shape not in (tuple(p.shape), ()):
            _fail(f"state tensor {key!r} is {e.dtype} {list(e.shape)}; optimizer state is float32 of the "
                  f"parameter's shape {list(p.shape)} or a scalar")
        slot = state.setdefault(i, {})
        if len(slot) >= MAX_STATE_KEYS:
            _fail(f"more than {MAX_STATE_KEYS} optimizer state tensors for {name!r}")
        slot[leaf] = check_finite(sf, key, sf.tensor(key))
    live = opt.state_dict()
    loaded: dict[str, Any] = {"state": state, "param_groups": live["param_groups"]}
    template = {k: v for k, v in live.items() if k not in ("state", "param_groups") and isinstance(v, torch.Tensor)}
    present = {k[len(prefix) + 7:] for k in keys_under(sf, prefix + ".extra/")}
    if present != set(template):
        _fail(f"{prefix} optimizer extras are {sorted(present)}, this optimizer has {sorted(template)}")
    for k, t in template.items():
        sf.expect(f"{prefix}.extra/{k}", t.dtype, tuple(t.shape))
        loaded[k] = check_finite(sf, f"{prefix}.extra/{k}", sf.tensor(f"{prefix}.extra/{k}"))
    return loaded
