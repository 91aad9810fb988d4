"""The payload envelope: the only place where codec buffers become bytes and bytes become tensors.

The format, byte by byte and for every codec, for implementations in other languages: docs/wire.md (test vectors in
tests/vectors/). What follows is the summary this module implements.

Frame, unsigned: ``b"LBW1"`` + msgpack body + 8-byte BLAKE2b digest of the body.
Frame, signed (a node with a key, node/identity.py): ``b"LBSF"`` + msgpack body + 64-byte ed25519 signature +
8-byte BLAKE2b digest of (body + signature). The signature covers
``signed_message("lowband/frame/v1", run id, round, sender, sha256(body))`` (node/keyring.py): who sent which bytes
for which round of which run. The BLAKE2b digest only catches corruption in transit; the signature binds the frame
to its sender. The body is the same in both, a map

    {"v": 1, "run": str, "round": int, "sender": str,
     "codec": str, "codec_v": int, "params": {...},
     "tensors": [[name, [dims...]], ...],          # the model's tensors, in model order
     "buffers": [[bytes, ...], ...],               # per tensor, in the codec's layout order
     "extra": [[name, dtype, [dims...], bytes], ...]}   # only for models with buffers (below)

``extra`` carries the model's buffers (BatchNorm statistics and the like) dense, in their own dtype and in model
order, with no codec: they are small and are averaged (floating) or maxed (integer) across the round's members, not
compressed (docs/algorithms.md, §10). A model without buffers sends no ``extra`` field, so its frames are byte for
byte what they were before buffers travelled.

``unpack`` checks everything against what the receiver expects — frame size, digest, then (given a ``KeyRing``)
the signature against the key registered for the sender, then msgpack limits, field types, run, round, sender, codec
and its parameters, tensor names and shapes, every buffer's exact length — *before* it allocates any tensor, then lets
the codec check contents (finite values, index ranges). Every failure is a ``PayloadError`` whose message names the
field; a signature that verifies for another round, run or sender says so ("signed by 'w1' for round 6, replayed in
round 7").
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import msgpack
import torch

from node.compress.base import Codec, Encoded, Shape
from node.errors import PayloadError, SignatureError
from node.identity import SIGNATURE_BYTES, NodeKey, verify
from node.keyring import KeyRing, frame_message

FORMAT_VERSION = 1
MAGIC = b"LBW1"
SIGNED_MAGIC = b"LBSF"  # 6 bits from MAGIC: no single bit flip turns one into the other
DIGEST_BYTES = 8
_FIELDS = {"v", "run", "round", "sender", "codec", "codec_v", "params", "tensors", "buffers"}
_MAX_NAME = 256
#: dtypes a buffer may have on the wire, by the code the frame (and the state file, which uses safetensors' names)
#: gives them; little-endian, as torch stores them on every platform lowband runs on
DTYPE_CODES: dict[str, torch.dtype] = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                                       "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                                       "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
CODE_OF: dict[torch.dtype, str] = {v: k for k, v in DTYPE_CODES.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: Shape


ModelSpec = Sequence[TensorSpec]


@dataclass(frozen=True)
class ExtraSpec:
    """A buffer that travels dense in the frame's ``extra`` section: its name, shape and dtype (one of
    ``DTYPE_CODES``)."""

    name: str
    shape: Shape
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


ExtraSpecs = Sequence[ExtraSpec]


@dataclass(frozen=True)
class Envelope:
    """A validated payload: who sent it, for which round, and each tensor's codec buffers."""

    run: str
    round: int
    sender: str
    tensors: dict[str, Encoded]
    nbytes: int
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # buffer name → its value (``ExtraSpec`` dtype)


def model_spec(named: Sequence[tuple[str, torch.Tensor]]) -> list[TensorSpec]:
    return [TensorSpec(name, tuple(t.shape)) for name, t in named]


def _digest(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=DIGEST_BYTES).digest()


def _raw(buf: torch.Tensor) -> bytes:
    return buf.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def pack(run: str, round_: int, sender: str, codec: Codec, spec: ModelSpec, encoded: dict[str, Encoded],
         extra_spec: ExtraSpecs = (), extra: dict[str, torch.Tensor] | None = None, key: NodeKey | None = None) -> bytes:
    """Codec buffers of every tensor (and, for a model with buffers, each buffer's value) → one frame, signed with
    ``key`` when given (module doc).

    ``extra``: buffer name → tensor of exactly its ``ExtraSpec`` shape and dtype; required when ``extra_spec`` is
    not empty. Raises ValueError when a buffer does not match its spec (a caller's bug, caught before sending)."""
    tensors, buffers = [], []
    for t in spec:
        enc = encoded[t.name]
        tensors.append([t.name, list(t.shape)])
        buffers.append([_raw(enc[key]) for key in codec.layout(t.shape)])
    body_map: dict[str, Any] = {"v": FORMAT_VERSION, "run": run, "round": round_, "sender": sender,
                                "codec": codec.name, "codec_v": codec.version, "params": codec.params(),
                                "tensors": tensors, "buffers": buffers}
    if extra_spec:
        values = extra or {}
        entries = []
        for e in extra_spec:
            value = values[e.name]
            if tuple(value.shape) != e.shape or value.dtype != e.dtype:
                raise ValueError(f"buffer {e.name!r} is {value.dtype} {tuple(value.shape)}, its spec {e.dtype} {e.shape}")
            entries.append([e.name, CODE_OF[e.dtype], list(e.shape), _raw(value)])
        body_map["extra"] = entries
    body = msgpack.packb(body_map, use_bin_type=True)
    if key is None:
        return MAGIC + body + _digest(body)
    signature = key.sign(frame_message(run, round_, sender, hashlib.sha256(body).digest()))
    return SIGNED_MAGIC + body + signature + _digest(body + signature)


def expected_size(codec: Codec, spec: ModelSpec, run: str, sender: str, round_: int = 0,
                  extra_spec: ExtraSpecs = (), signed: bool = False) -> int:
    """Exact frame size for this model (depends on name lengths, so computed by packing zeros); ``signed``: with the
    64-byte signature."""
    zeros = {t.name: {k: torch.zeros(b.numel, dtype=b.dtype) for k, b in codec.layout(t.shape).items()}
             for t in spec}
    extra = {e.name: torch.zeros(e.shape, dtype=e.dtype) for e in extra_spec}
    return len(pack(run, round_, sender, codec, spec, zeros, extra_spec, extra)) + (SIGNATURE_BYTES if signed else 0)


def max_frame_size(codec: Codec, spec: ModelSpec, extra_spec: ExtraSpecs = ()) -> int:
    """An upper bound on any honest frame for this model: payload bytes + generous header room."""
    payload = sum(codec.nbytes(t.shape) for t in spec) + sum(e.nbytes for e in extra_spec)
    # 4 · _MAX_NAME: a sender of up to _MAX_NAME characters takes up to 4 bytes per character in UTF-8
    header = 1024 + 4 * _MAX_NAME + sum(len(t.name.encode()) + 16 + 10 * len(t.shape)
                                        + 16 * len(codec.layout(t.shape)) for t in spec)
    header += sum(len(e.name.encode()) + 32 + 10 * len(e.shape) for e in extra_spec)
    return len(MAGIC) + payload + header + SIGNATURE_BYTES + DIGEST_BYTES


def _need(cond: bool, message: str, error: type[PayloadError] = PayloadError) -> None:
    if not cond:
        raise error(message)


def split(data: bytes, limit: int) -> tuple[bytes, bytes | None]:
    """A frame's (body, signature or None for an unsigned frame), after checking its type, size, magic and digest.
    Raises PayloadError."""
    _need(isinstance(data, (bytes, bytearray, memoryview)), f"payload must be bytes, got {type(data).__name__}")
    data = bytes(data)
    _need(len(data) <= limit, f"payload is {len(data)} bytes, more than the limit of {limit} for this model")
    _need(len(data) >= len(MAGIC) + DIGEST_BYTES + 1, f"payload is truncated ({len(data)} bytes)")
    magic, digest = data[:len(MAGIC)], data[-DIGEST_BYTES:]
    _need(magic in (MAGIC, SIGNED_MAGIC), f"payload does not start with the lowband magic {MAGIC!r} (or the signed {SIGNED_MAGIC!r})")
    if magic == MAGIC:
        body = data[len(MAGIC):-DIGEST_BYTES]
        _need(_digest(body) == digest, "payload digest mismatch (truncated or corrupted in transit)")
        return body, None
    _need(len(data) >= len(MAGIC) + SIGNATURE_BYTES + DIGEST_BYTES + 1, f"signed payload is truncated ({len(data)} bytes)")
    signed = data[len(MAGIC):-DIGEST_BYTES]
    _need(_digest(signed) == digest, "payload digest mismatch (truncated or corrupted in transit)")
    return signed[:-SIGNATURE_BYTES], signed[-SIGNATURE_BYTES:]


@dataclass(frozen=True)
class _Shape:
    """How many arrays and maps, and how long an array, an envelope of this model can hold: a body is decoded only
    within these, so a frame of up to the size limit cannot make a receiver build ~70 Python objects per byte (a
    body of empty arrays or maps) before its fields are checked — or, to explain a failed signature, before the
    signature is known to be good."""

    max_array: int
    max_containers: int

    @classmethod
    def of(cls, tensors: int, extra: int) -> "_Shape":
        # the envelope: its map, params, tensors + T [name, shape] + T shapes, buffers + T lists, extra + E entries +
        # E shapes: 4 + 3T + 2E containers (and nesting within params); arrays of T, E, a layout or a shape's dims
        return cls(max(64, tensors, extra), 32 + 4 * (tensors + extra))


_ANY = _Shape(1 << 20, 1 << 30)


def _msgpack(body: bytes, limit: int, shape: _Shape = _ANY) -> Any:
    containers = 0

    def count(x: Any) -> Any:
        nonlocal containers
        containers += 1
        if containers > shape.max_containers:
            raise ValueError(f"more than {shape.max_containers} arrays and maps")
        return x

    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True,
                               max_bin_len=limit, max_str_len=64 * 1024, max_array_len=shape.max_array,
                               max_map_len=min(4096, shape.max_array), max_ext_len=0, list_hook=count,
                               object_hook=count)
    except Exception as exc:  # msgpack raises many types; all mean "not an envelope"
        raise PayloadError(f"payload body is not valid msgpack: {type(exc).__name__}: {exc}") from None


def _claims(body: bytes, limit: int, shape: _Shape = _ANY) -> tuple[str, int, str] | None:
    """(run, round, sender) as the body states them, or None when it does not (only to explain a failed signature)."""
    try:
        obj = _msgpack(body, limit, shape)
    except PayloadError:
        return None
    if not isinstance(obj, dict):
        return None
    run, round_, sender = obj.get("run"), obj.get("round"), obj.get("sender")
    if isinstance(run, str) and _is_int(round_) and isinstance(sender, str):
        return run, round_, sender
    return None


def verify_signature(body: bytes, signature: bytes | None, keys: KeyRing, run: str, round_: int | None,
                     sender: str | None, limit: int, shape: _Shape = _ANY) -> None:
    """Check a frame's signature against the key ``keys`` holds for ``sender`` (the name the transport delivered
    it under; None: the name the body states), over (``run``, ``round_``, sender, sha256(body)) — before the body is
    decoded, except to explain a failure. Raises SignatureError (a PayloadError) saying why: not signed, no key for
    the sender, signed for another run or round (a replay), signed by another member (a swapped sender), or not by
    this key at all (wrong key, or the body changed after signing)."""
    claims = _claims(body, limit, shape) if sender is None or round_ is None else None
    who = sender if sender is not None else (claims[2] if claims else None)
    _need(who is not None, "payload names no sender: its signature cannot be checked", SignatureError)
    _need(signature is not None, f"frame from {who!r} is not signed, and this run verifies every frame against its "
                                 "sender's key", SignatureError)
    assert signature is not None and who is not None
    public = keys.get(who)
    _need(public is not None, f"no key is registered for sender {who!r}: its frames cannot be verified",
          SignatureError)
    assert public is not None
    sha = hashlib.sha256(body).digest()
    if round_ is not None and verify(public, signature, frame_message(run, round_, who, sha)):
        return
    claims = claims or _claims(body, limit, shape)
    if claims is not None and verify(public, signature, frame_message(*claims, sha)):
        c_run, c_round, c_sender = claims
        _need(c_run == run, f"frame signed by {who!r} for run {c_run!r} replayed in run {run!r}", SignatureError)
        _need(round_ is None or c_round == round_,
              f"frame signed by {who!r} for round {c_round} replayed in round {round_}", SignatureError)
        _need(c_sender == who, f"frame signed by {who!r} names sender {c_sender!r}", SignatureError)
        return
    if claims is not None and claims[2] != who and claims[2] in keys \
            and verify(keys[claims[2]], signature, frame_message(*claims, sha)):
        raise SignatureError(f"frame signed by {keys.describe(claims[2])} arrived as {who!r}'s (a swapped sender)")
    raise SignatureError(f"signature does not verify against the key registered for {keys.describe(who)} (another "
                         "key signed it, or the frame changed after signing)")


def _decode_body(body: bytes, limit: int, with_extra: bool = False, shape: _Shape = _ANY) -> dict[str, Any]:
    obj = _msgpack(body, limit, shape)
    _need(isinstance(obj, dict), f"envelope must be a map, got {type(obj).__name__}")
    fields = _FIELDS | {"extra"} if with_extra else _FIELDS
    _need(set(obj) == fields, f"envelope fields are {sorted(map(str, obj))}, expected {sorted(fields)}")
    return obj


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _same(got: Any, want: Any) -> bool:
    """Equality that also requires equal types (True ≠ 1 ≠ 1.0); msgpack turns tuples into lists."""
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
    if isinstance(want, (list, tuple)):
        return isinstance(got, list) and len(got) == len(want) and all(_same(g, w) for g, w in zip(got, want))
    return type(got) is type(want) and got == want


def unpack(data: bytes, codec: Codec, spec: ModelSpec, run: str, round_: int | None = None,
           limit: int | None = None, extra_spec: ExtraSpecs = (), *, sender: str | None = None,
           keys: KeyRing | None = None) -> Envelope:
    """Validate a frame from outside against the expected run/round/codec/model (and buffers, ``extra_spec``); see
    module doc. ``sender``: the name the transport delivered it under (the body must name the same); ``keys``: verify
    the signature against the key registered for the sender first (None: no signature is checked). Raises
    PayloadError naming the field."""
    limit = max_frame_size(codec, spec, extra_spec) if limit is None else limit
    body, signature = split(data, limit)
    shape = _Shape.of(len(spec), len(extra_spec))
    if keys is not None:
        verify_signature(body, signature, keys, run, round_, sender, limit, shape)
    obj = _decode_body(body, limit, bool(extra_spec), shape)
    _need(_is_int(obj["v"]) and obj["v"] == FORMAT_VERSION,
          f"envelope format version {obj['v']!r} is not supported (expected {FORMAT_VERSION})")
    _need(isinstance(obj["run"], str), "field 'run' must be a string")
    _need(obj["run"] == run, f"payload is for run {obj['run']!r}, this run is {run!r}")
    _need(_is_int(obj["round"]) and obj["round"] >= 0, f"field 'round' must be a non-negative integer, got {obj['round']!r}")
    if round_ is not None:
        _need(obj["round"] == round_, f"payload is for round {obj['round']}, expected round {round_}")
    _need(isinstance(obj["sender"], str) and 0 < len(obj["sender"]) <= _MAX_NAME,
          "field 'sender' must be a non-empty string of at most 256 characters")
    _need(sender is None or obj["sender"] == sender, f"frame names sender {obj['sender']!r} but came from {sender!r}")
    _need(obj["codec"] == codec.name and _is_int(obj["codec_v"]) and obj["codec_v"] == codec.version,
          f"payload codec {obj['codec']!r} v{obj['codec_v']!r} differs from this run's {codec.name!r} v{codec.version}")
    _need(_same(obj["params"], codec.params()),
          f"payload codec parameters {obj['params']!r} differ from this run's {codec.params()!r}")
    tensors, buffers = obj["tensors"], obj["buffers"]
    _need(isinstance(tensors, list) and len(tensors) == len(spec),
          f"payload has {len(tensors) if isinstance(tensors, list) else 'no list of'} tensors, the model has {len(spec)}")
    _need(isinstance(buffers, list) and len(buffers) == len(spec), "field 'buffers' must hold one list per tensor")
    for i, (entry, want) in enumerate(zip(tensors, spec)):
        _need(isinstance(entry, list) and len(entry) == 2, f"tensors[{i}] must be [name, shape]")
        name, shape = entry
        _need(name == want.name, f"tensors[{i}] is {name!r}, expected {want.name!r}")
        _need(isinstance(shape, list) and all(_is_int(d) for d in shape) and tuple(shape) == want.shape,
              f"tensor {want.name!r} has shape {shape!r}, the model has {list(want.shape)}")
        layout = codec.layout(want.shape)
        bufs = buffers[i]
        _need(isinstance(bufs, list) and len(bufs) == len(layout),
              f"tensor {want.name!r} must carry {len(layout)} buffers {list(layout)}")
        for raw, (key, bspec) in zip(bufs, layout.items()):
            _need(isinstance(raw, bytes), f"tensor {want.name!r} buffer {key!r} must be binary")
            _need(len(raw) == bspec.nbytes,
                  f"tensor {want.name!r} buffer {key!r} is {len(raw)} bytes, expected {bspec.nbytes}")
    if extra_spec:
        _check_extra(obj["extra"], extra_spec)
    # Sizes are right: now allocate, then let the codec check contents.
    out: dict[str, Encoded] = {}
    for want, bufs in zip(spec, buffers):
        layout = codec.layout(want.shape)
        enc = {key: torch.frombuffer(bytearray(raw), dtype=bspec.dtype) if raw else torch.empty(0, dtype=bspec.dtype)
               for raw, (key, bspec) in zip(bufs, layout.items())}
        try:
            codec.validate(enc, want.shape)
        except PayloadError as exc:
            raise PayloadError(f"tensor {want.name!r}: {exc}") from None
        out[want.name] = enc
    extra = {}
    for e, entry in zip(extra_spec, obj.get("extra", ())):
        raw = entry[3]
        value = (torch.frombuffer(bytearray(raw), dtype=e.dtype) if raw else torch.empty(0, dtype=e.dtype)).reshape(e.shape)
        _need(not value.is_floating_point() or bool(torch.isfinite(value).all()),
              f"buffer {e.name!r} holds non-finite values")
        extra[e.name] = value
    return Envelope(run=obj["run"], round=obj["round"], sender=obj["sender"], tensors=out, nbytes=len(data),
                    extra=extra)


def _check_extra(entries: Any, extra_spec: ExtraSpecs) -> None:
    """Names, dtypes, shapes and exact byte lengths of the ``extra`` section, before anything is allocated."""
    _need(isinstance(entries, list) and len(entries) == len(extra_spec),
          f"field 'extra' must hold one entry per model buffer ({len(extra_spec)})")
    for i, (entry, e) in enumerate(zip(entries, extra_spec)):
        _need(isinstance(entry, list) and len(entry) == 4, f"extra[{i}] must be [name, dtype, shape, bytes]")
        name, code, shape, raw = entry
        _need(name == e.name, f"extra[{i}] is {name!r}, expected buffer {e.name!r}")
        _need(isinstance(code, str) and code == CODE_OF[e.dtype],
              f"buffer {e.name!r} has dtype {code!r}, the model has {CODE_OF[e.dtype]}")
        _need(isinstance(shape, list) and all(_is_int(d) for d in shape) and tuple(shape) == e.shape,
              f"buffer {e.name!r} has shape {shape!r}, the model has {list(e.shape)}")
        _need(isinstance(raw, bytes) and len(raw) == e.nbytes,
              f"buffer {e.name!r} must be {e.nbytes} bytes of binary")
