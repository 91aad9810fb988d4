"""The sharded reduce of a large serverless round, as pure functions and one model-aware codec object.

Above ``dht.shard_above`` agreed members a round is not an all-gather (every peer fetching every frame) but a
reduce-scatter then all-gather, as hivemind's butterfly all-reduce (hivemind ``averaging/partition.py``: each peer
owns a part of the vector; Ryabinin et al., "Moshpit SGD", arXiv 2103.03239):

1. ``plan_shards``: the model's tensors are cut into ``S = min(N, tensors)`` contiguous shards balanced by payload
   bytes (the codec's exact per-tensor byte formula), from the agreed member count ``N`` alone — every peer of the
   round computes the same plan. A shard is whole tensors: the codecs encode per tensor (one sign scale, one DCT
   block grid per tensor), so a tensor is never split; a model whose largest tensor is a large part of the payload
   is balanced only as well as that allows (docs/serverless.md, "Sharded rounds").
2. ``fallback_order``: shard ``s`` is owned by the ``s``-th agreed member (sorted by name); if it computes nothing
   within the owner wait, the next member in ``(s + j) mod N`` order computes it, and so on.
3. ``ShardCodec.slice``: each member serves, per shard, a *slice* of its frame — a wire frame (``node/wire.py``) of
   that shard's tensors (shard 0 also carries the model's buffers), signed with its node key.
4. ``ShardCodec.reduce``: the owner checks every agreed member's slice (signature, model, round) and reduces them
   with the run codec's ``reduce``, members sorted by name — per tensor exactly what ``Reference.reduce`` computes
   for the whole frame. It encodes the partial aggregate with the *aggregate codec* (``aggregate_codec``) and
   publishes its sha256 in a shard record signed with its own key (every honest computer makes the same bytes).
5. ``ShardCodec.assemble``: every peer fetches each shard's aggregate, checks it, and assembles one aggregate frame
   for the worker (what a coordinator's aggregate mode sends): every replica applies the same decoded aggregate.

The aggregate codec: a dense run (identity, bf16, fp16: a ``DenseCodec``) re-encodes with the run file's
``rounds.aggregate_codec`` (default identity: the applied step is bit-identical to the all-gather's); a compressed
run (sign, DCT-top-k, top-k) re-encodes with its own codec and *no* error feedback (an owner's residual would be lost
whenever ownership moves), so the step is ``decode(encode(mean))`` instead of ``mean`` — for sign, the sign of the
mean times its mean magnitude. The quality cost is stated in docs/serverless.md.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import msgpack
import torch

from node import wire
from node.compress import make_codec
from node.compress.base import Codec
from node.compress.dense import DenseCodec
from node.errors import PayloadError
from node.identity import NodeKey
from node.keyring import KeyRing
from node.train.buffer_reduce import reduce_buffer
from node.transport.dht_agreement import Pair, encode_pairs

MAX_SHARDS = 4096  # the most reduce shards a round has (one per agreed member at most)
MAX_FRAME = 4 << 30  # as dht_frames.MAX_FRAME; the exact bound of a shard aggregate is the model's (``max_aggregate``)
AGGREGATE_SENDER = "coordinator"  # the sender an assembled aggregate frame names (as node/train/reference.py's)


# -- the plan -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardPlan:
    """Contiguous tensor ranges: shard ``s`` is tensors ``bounds[s]`` to ``bounds[s + 1]`` (model order)."""

    bounds: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.bounds) - 1

    def tensors(self, shard: int) -> range:
        return range(self.bounds[shard], self.bounds[shard + 1])


def plan_shards(sizes: Sequence[int], count: int) -> ShardPlan:
    """``min(count, len(sizes))`` contiguous, non-empty shards of tensors whose payload bytes are ``sizes``, the
    largest shard as small as contiguity allows (binary search on the largest shard's bytes, greedy cuts), then the
    fullest shards split further until there are that many. Deterministic. Raises ValueError for no tensors or a
    count < 1."""
    n = len(sizes)
    if n == 0 or count < 1:
        raise ValueError(f"a shard plan needs tensors and a count ≥ 1 (got {n} tensors, count {count})")
    count = min(count, n)

    def cuts(cap: int) -> list[int]:
        out, load = [0], 0
        for i, size in enumerate(sizes):
            if load and load + size > cap:
                out.append(i)
                load = 0
            load += size
        return out + [n]

    lo, hi = max(sizes), max(sum(sizes), 1)
    while lo < hi:  # the smallest cap with at most ``count`` shards
        mid = (lo + hi) // 2
        if len(cuts(mid)) - 1 <= count:
            hi = mid
        else:
            lo = mid + 1
    bounds = cuts(lo)
    while len(bounds) - 1 < count:  # fewer shards than asked: split the fullest splittable one at its middle byte
        loads = [(sum(sizes[a:b]), -s) for s, (a, b) in enumerate(zip(bounds, bounds[1:])) if b - a > 1]
        _, neg = max(loads)
        a, b = bounds[-neg], bounds[-neg + 1]
        half, acc, at = sum(sizes[a:b]) / 2, 0, a + 1
        for i in range(a, b - 1):
            acc += sizes[i]
            at = i + 1
            if acc >= half:
                break
        bounds.insert(-neg + 1, at)
    return ShardPlan(tuple(bounds))


def fallback_order(shard: int, members: Sequence[str]) -> list[str]:
    """Who computes shard ``shard``: its owner (the ``shard``-th of the sorted members) first, then the next ones
    in ring order. Every peer derives the same order from the agreed members."""
    ranked = sorted(members)
    return [ranked[(shard + j) % len(ranked)] for j in range(len(ranked))]


def members_digest(pairs: Iterable[Pair]) -> str:
    """sha256 (hex) of the agreed (sender, frame sha256) pairs: a shard aggregate names the set it reduces."""
    return hashlib.sha256(repr(encode_pairs(pairs)).encode()).hexdigest()


# -- the record of a computed shard -------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardEntry:
    """"I computed shard ``shard`` of ``count`` for the agreed set ``members`` (digest); its aggregate is ``size``
    bytes with this sha256", as stored (signed) under ``{run}/round/{r}/shard`` by its publisher."""

    shard: int
    count: int
    size: int
    sha256: str
    members: str

    def encode(self) -> list[Any]:
        return [self.shard, self.count, self.size, self.sha256, self.members]

    @classmethod
    def parse(cls, value: Any) -> "ShardEntry | None":
        if not (isinstance(value, (list, tuple)) and len(value) == 5
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value[:3])
                and all(_is_hex64(v) for v in value[3:])):
            return None
        shard, count, size = value[:3]
        if not (1 <= count <= MAX_SHARDS and 0 <= shard < count and 0 < size <= MAX_FRAME):
            return None
        return cls(shard, count, size, value[3], value[4])


def parse_entries(value: Any) -> list[ShardEntry] | None:
    """A publisher's shard entries (at most ``MAX_SHARDS``, each shard once); None when malformed."""
    if not isinstance(value, (list, tuple)) or len(value) > MAX_SHARDS:
        return None
    entries = [ShardEntry.parse(v) for v in value]
    if any(e is None for e in entries) or len({e.shard for e in entries if e is not None}) != len(entries):
        return None
    return [e for e in entries if e is not None]


def _is_hex64(text: Any) -> bool:
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


# -- the model-aware part -----------------------------------------------------------------------------------
def aggregate_codec(codec: Codec, dense_choice: str) -> Codec:
    """What shard aggregates travel as: ``dense_choice`` (``rounds.aggregate_codec``) for a dense run codec, the run
    codec itself (its parameters, no error feedback) for a compressed one (module doc)."""
    return make_codec(dense_choice) if isinstance(codec, DenseCodec) else codec


def reduce_extra(specs: wire.ExtraSpecs, envelopes: Sequence[wire.Envelope]) -> dict[str, torch.Tensor]:
    """Each model buffer's agreed value over ``envelopes`` (sorted by sender), as ``Reference.reduce_buffers``:
    floating ones the fp64 sum in order, one division, cast back; integer ones the max; bool ones any."""
    return {spec.name: reduce_buffer([e.extra[spec.name] for e in envelopes], spec) for spec in specs}


@dataclass(frozen=True)
class ShardCodec:
    """The run's codec and model as the sharded reduce needs them: slices, shard aggregates, the assembled frame.
    ``aggregate``: what shard aggregates are encoded with (``aggregate_codec``)."""

    run_id: str
    codec: Codec
    spec: tuple[wire.TensorSpec, ...]
    extra_spec: tuple[wire.ExtraSpec, ...]
    aggregate: Codec

    @classmethod
    def from_frame(cls, frame: bytes, dense_choice: str = "identity") -> "ShardCodec":
        """The run, codec and model a frame *we* packed names (our own, trusted: this is not for frames from
        outside). Raises PayloadError when it is not a frame."""
        body, _signature = wire.split(frame, len(frame))
        try:
            obj = msgpack.unpackb(body, raw=False)
        except Exception as exc:  # msgpack raises many types
            raise PayloadError(f"not a lowband frame: {exc}") from None
        if not isinstance(obj, dict) or not {"run", "codec", "params", "tensors"} <= set(obj):
            raise PayloadError("not a lowband frame")
        codec = make_codec(obj["codec"], obj["params"])
        spec = tuple(wire.TensorSpec(name, tuple(shape)) for name, shape in obj["tensors"])
        extra = tuple(wire.ExtraSpec(name, tuple(shape), wire.DTYPE_CODES[code])
                      for name, code, shape, _raw in obj.get("extra", ()))
        return cls(obj["run"], codec, spec, extra, aggregate_codec(codec, dense_choice))

    def plan(self, members: int) -> ShardPlan:
        """The round's shard plan for ``members`` agreed members."""
        return plan_shards([self.codec.nbytes(t.shape) for t in self.spec], min(members, MAX_SHARDS))

    def sub_spec(self, plan: ShardPlan, shard: int) -> tuple[list[wire.TensorSpec], tuple[wire.ExtraSpec, ...]]:
        """(tensors, buffers) of shard ``shard``: the buffers ride with shard 0."""
        return [self.spec[i] for i in plan.tensors(shard)], (self.extra_spec if shard == 0 else ())

    def max_slice(self, plan: ShardPlan, shard: int) -> int:
        tensors, extra = self.sub_spec(plan, shard)
        return wire.max_frame_size(self.codec, tensors, extra)

    def max_aggregate(self, plan: ShardPlan, shard: int) -> int:
        tensors, extra = self.sub_spec(plan, shard)
        return wire.max_frame_size(self.aggregate, tensors, extra)

    # -- slices (a member's frame, by shard) ----------------------------------------------------------------
    def open_own(self, frame: bytes, round_: int, sender: str) -> wire.Envelope:
        """Our own frame as an envelope (checked like any other: a bug here must not reach the others)."""
        return wire.unpack(frame, self.codec, self.spec, self.run_id, round_, extra_spec=self.extra_spec,
                           sender=sender)

    def slice(self, own: wire.Envelope, plan: ShardPlan, shard: int, key: NodeKey | None) -> bytes:
        """The slice of ``own`` for ``shard``: a wire frame of its tensors (and buffers, shard 0), signed by ``key``."""
        tensors, extra = self.sub_spec(plan, shard)
        return wire.pack(self.run_id, own.round, own.sender, self.codec, tensors,
                         {t.name: own.tensors[t.name] for t in tensors}, extra, own.extra if extra else None, key=key)

    def open_slice(self, data: bytes, round_: int, sender: str, plan: ShardPlan, shard: int,
                   public: bytes | None) -> wire.Envelope:
        """A slice from outside, checked against the shard's tensors, the round, the sender and (given ``public``)
        the sender's signature. Raises PayloadError naming what is wrong."""
        tensors, extra = self.sub_spec(plan, shard)
        keys = KeyRing({sender: public}) if public is not None else None
        return wire.unpack(data, self.codec, tensors, self.run_id, round_, self.max_slice(plan, shard), extra,
                           sender=sender, keys=keys)

    # -- shard aggregates -----------------------------------------------------------------------------------
    def reduce(self, slices: Sequence[wire.Envelope], plan: ShardPlan, shard: int) -> bytes:
        """The shard's aggregate frame: the run codec's reduce of ``slices`` (every agreed member's, sorted by
        sender) per tensor, encoded with the aggregate codec; unsigned and named ``AGGREGATE_SENDER``, so every honest
        computer of the shard produces the same bytes (its signed shard record names their sha256)."""
        if not slices or [s.sender for s in slices] != sorted(s.sender for s in slices):
            raise ValueError("a shard reduce needs the slices sorted by sender (at least one)")
        tensors, extra = self.sub_spec(plan, shard)
        encoded = {}
        for t in tensors:
            mean = self.codec.reduce([s.tensors[t.name] for s in slices], t.shape)  # fp32, t.shape
            encoded[t.name] = self.aggregate.encode(self.aggregate.fit(mean))
        values = reduce_extra(extra, slices) if extra else None
        return wire.pack(self.run_id, slices[0].round, AGGREGATE_SENDER, self.aggregate, tensors, encoded, extra,
                         values)

    def open_aggregate(self, data: bytes, round_: int, plan: ShardPlan, shard: int) -> wire.Envelope:
        """A shard aggregate from outside (its sha256 already checked against a member's signed shard record),
        checked: size, the shard's tensors, the round, the codec. Raises PayloadError."""
        tensors, extra = self.sub_spec(plan, shard)
        return wire.unpack(data, self.aggregate, tensors, self.run_id, round_, self.max_aggregate(plan, shard),
                           extra, sender=AGGREGATE_SENDER)

    def assemble(self, parts: Sequence[wire.Envelope], round_: int) -> bytes:
        """One aggregate frame (sender ``AGGREGATE_SENDER``, the aggregate codec) from every shard's aggregate, in
        shard order: what ``Reference.unpack_aggregate`` reads."""
        encoded = {name: enc for part in parts for name, enc in part.tensors.items()}
        extra = parts[0].extra if self.extra_spec else None
        return wire.pack(self.run_id, round_, AGGREGATE_SENDER, self.aggregate, self.spec, encoded, self.extra_spec,
                         extra)
