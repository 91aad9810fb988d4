"""The sharded reduce's pure core (node/transport/dht_shards.py): the plan, the fallback order, the records, and the
reduce equivalence with the all-gather (every frame unpacked, the codec's reduce per tensor, senders sorted — what
``Reference.reduce`` computes)."""
from __future__ import annotations

import random

import pytest
import torch

from node import wire
from node.compress import make_codec
from node.errors import PayloadError, SignatureError
from node.identity import NodeKey
from node.transport.dht_shards import (MAX_SHARDS, ShardCodec, ShardEntry, fallback_order, members_digest,
                                       parse_entries, plan_shards)

RUN = "shards-test"
SHAPES = [(64, 32), (32,), (128, 16), (7,), (16, 16), (300,), (3, 5, 7), (1,)]
SPEC = [wire.TensorSpec(f"t{i}", s) for i, s in enumerate(SHAPES)]
EXTRA = [wire.ExtraSpec("bn.mean", (4,), torch.float32), wire.ExtraSpec("bn.count", (), torch.int64)]
NAMES = ["a", "b", "c", "d", "e"]
KEYS = {n: NodeKey.generate() for n in NAMES}


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 20])
def test_the_plan_covers_every_tensor_once_in_order_and_is_deterministic(count: int) -> None:
    rng = random.Random(count)
    sizes = [rng.randint(1, 10_000) for _ in range(40)]
    plan = plan_shards(sizes, count)
    assert plan == plan_shards(list(sizes), count)
    assert plan.count == min(count, len(sizes))
    covered = [i for s in range(plan.count) for i in plan.tensors(s)]
    assert covered == list(range(len(sizes)))  # every tensor once, contiguous, in model order
    assert all(len(plan.tensors(s)) >= 1 for s in range(plan.count))


def test_the_plan_is_balanced_by_bytes() -> None:
    sizes = [1000] * 64
    plan = plan_shards(sizes, 8)
    assert [len(plan.tensors(s)) for s in range(8)] == [8] * 8
    # the largest shard is as small as contiguity allows: no larger than the mean plus one tensor
    rng = random.Random(7)
    sizes = [rng.randint(1, 5000) for _ in range(200)]
    for count in (4, 16, 64):
        plan = plan_shards(sizes, count)
        loads = [sum(sizes[i] for i in plan.tensors(s)) for s in range(plan.count)]
        assert max(loads) <= sum(sizes) / count + max(sizes)


def test_one_large_tensor_is_a_shard_of_its_own() -> None:
    plan = plan_shards([10, 10, 1000, 10, 10], 3)
    loads = [sum([10, 10, 1000, 10, 10][i] for i in plan.tensors(s)) for s in range(plan.count)]
    assert 1000 in loads and plan.count == 3


def test_the_plan_refuses_no_tensors_or_no_shards() -> None:
    with pytest.raises(ValueError):
        plan_shards([], 3)
    with pytest.raises(ValueError):
        plan_shards([1, 2], 0)


def test_the_fallback_order_starts_at_the_owner_and_visits_every_member_once() -> None:
    for shard in range(len(NAMES)):
        order = fallback_order(shard, list(reversed(NAMES)))
        assert order[0] == sorted(NAMES)[shard] and sorted(order) == sorted(NAMES)
        assert order == fallback_order(shard, NAMES)


def test_shard_entries_are_parsed_strictly() -> None:
    sha, digest = "ab" * 32, members_digest({("a", "cd" * 32)})
    good = ShardEntry(1, 3, 100, sha, digest)
    assert ShardEntry.parse(good.encode()) == good
    for bad in ([3, 3, 100, sha, digest], [0, 0, 100, sha, digest], [0, MAX_SHARDS + 1, 1, sha, digest],
                [0, 3, 0, sha, digest], [0, 3, 100, "zz" * 32, digest], [True, 3, 100, sha, digest],
                [0, 3, 100, sha], "x", None):
        assert ShardEntry.parse(bad) is None
    assert parse_entries([good.encode(), good.encode()]) is None  # one shard twice
    assert parse_entries([good.encode(), [0, 3, 5, sha, digest]]) is not None
    assert parse_entries([[0, 3, 5, sha, digest]] * (MAX_SHARDS + 1)) is None
    assert members_digest({("a", sha), ("b", sha)}) == members_digest([("b", sha), ("a", sha)])


def _frames(codec_name: str, params: dict | None = None, round_: int = 3) -> tuple[dict[str, bytes], ShardCodec]:
    codec = make_codec(codec_name, params)
    gen = torch.Generator().manual_seed(0)
    frames = {}
    for n in NAMES:
        encoded = {t.name: codec.encode(torch.randn(t.shape, generator=gen) * 1e-3) for t in SPEC}
        extra = {"bn.mean": torch.randn(4, generator=gen), "bn.count": torch.randint(0, 100, (), generator=gen)}
        frames[n] = wire.pack(RUN, round_, n, codec, SPEC, encoded, EXTRA, extra, key=KEYS[n])
    return frames, ShardCodec.from_frame(frames[NAMES[0]], "identity")


def _all_gather(frames: dict[str, bytes], sc: ShardCodec, round_: int = 3) -> list[torch.Tensor]:
    envs = [wire.unpack(frames[n], sc.codec, SPEC, RUN, round_, extra_spec=EXTRA, sender=n) for n in sorted(frames)]
    return [sc.codec.reduce([e.tensors[t.name] for e in envs], t.shape) for t in SPEC]


def _sharded(frames: dict[str, bytes], sc: ShardCodec, round_: int = 3) -> tuple[list[torch.Tensor], wire.Envelope]:
    members = sorted(frames)
    plan = sc.plan(len(members))
    owns = {n: sc.open_own(frames[n], round_, n) for n in members}
    parts = []
    for s in range(plan.count):
        slices = [sc.open_slice(sc.slice(owns[n], plan, s, KEYS[n]), round_, n, plan, s, KEYS[n].public)
                  for n in members]
        agg = sc.reduce(slices, plan, s)
        parts.append(sc.open_aggregate(agg, round_, plan, s))
    frame = sc.assemble(parts, round_)
    env = wire.unpack(frame, sc.aggregate, SPEC, RUN, round_, extra_spec=EXTRA)
    return [sc.aggregate.decode(env.tensors[t.name], t.shape) for t in SPEC], env


def test_sharded_equals_the_all_gather_bit_for_bit_for_identity() -> None:
    frames, sc = _frames("identity")
    assert sc.aggregate.name == "identity"
    full = _all_gather(frames, sc)
    sharded, env = _sharded(frames, sc)
    for a, b in zip(full, sharded):
        assert torch.equal(a, b)
    envs = [wire.unpack(frames[n], sc.codec, SPEC, RUN, 3, extra_spec=EXTRA) for n in sorted(frames)]
    mean = torch.stack([e.extra["bn.mean"].double() for e in envs]).sum(0).div(len(envs)).float()
    assert torch.equal(env.extra["bn.mean"], mean)
    assert int(env.extra["bn.count"]) == max(int(e.extra["bn.count"]) for e in envs)


@pytest.mark.parametrize("codec_name,params", [("sign", {"block": 64}), ("dct_topk", None)])
def test_sharded_compressed_is_the_run_codecs_encoding_of_the_all_gather(codec_name: str, params: dict | None) -> None:
    """A compressed run's shard aggregate is re-encoded with the run codec (no error feedback): the applied step is
    exactly decode(encode(all-gather mean)), tensor by tensor."""
    frames, sc = _frames(codec_name, params)
    assert sc.aggregate is sc.codec
    full = _all_gather(frames, sc)
    sharded, _ = _sharded(frames, sc)
    for t, a, b in zip(SPEC, full, sharded):
        assert torch.equal(sc.codec.decode(sc.codec.encode(a), t.shape), b)


def test_a_bf16_run_with_a_bf16_aggregate_is_the_bf16_rounding_of_the_all_gather() -> None:
    frames, _ = _frames("bf16")
    sc = ShardCodec.from_frame(frames["a"], "bf16")
    full = _all_gather(frames, sc)
    sharded, _ = _sharded(frames, sc)
    for a, b in zip(full, sharded):
        assert torch.equal(a.to(torch.bfloat16).float(), b)


def test_a_slice_signed_by_another_key_or_an_aggregate_of_another_round_or_shard_is_rejected() -> None:
    frames, sc = _frames("identity")
    plan = sc.plan(len(NAMES))
    own = sc.open_own(frames["a"], 3, "a")
    data = sc.slice(own, plan, 1, KEYS["a"])
    with pytest.raises(SignatureError):
        sc.open_slice(data, 3, "a", plan, 1, KEYS["b"].public)
    with pytest.raises(PayloadError):
        sc.open_slice(data, 4, "a", plan, 1, KEYS["a"].public)
    with pytest.raises(PayloadError):  # another shard's tensors
        sc.open_slice(data, 3, "a", plan, 2, KEYS["a"].public)
    slices = [sc.open_slice(sc.slice(sc.open_own(frames[n], 3, n), plan, 1, KEYS[n]), 3, n, plan, 1, KEYS[n].public)
              for n in sorted(NAMES)]
    agg = sc.reduce(slices, plan, 1)
    assert agg == sc.reduce(list(slices), plan, 1)  # every honest computer of a shard makes the same bytes
    with pytest.raises(PayloadError):  # another round's
        sc.open_aggregate(agg, 4, plan, 1)
    with pytest.raises(PayloadError):  # another shard's tensors
        sc.open_aggregate(agg, 3, plan, 2)
    with pytest.raises(PayloadError):  # changed in transit
        sc.open_aggregate(agg[:-1] + bytes([agg[-1] ^ 1]), 3, plan, 1)
    assert sc.open_aggregate(agg, 3, plan, 1).round == 3


def test_the_run_files_dht_section_is_checked_and_signed_only_when_set() -> None:
    from node.errors import ConfigError
    from node.runfile import DhtPolicy, build_run_file, parse_run_file

    plain = build_run_file(run_id="r", recipe="sign", rounds=3)
    assert parse_run_file(plain).dht == DhtPolicy() and parse_run_file(plain).dht_record() == {}  # old signatures hold
    tuned = parse_run_file(plain + "\n[dht]\nshard_above = 4\nowner_wait_s = 2.5\n")
    assert tuned.dht == DhtPolicy(4, 2.5)
    assert tuned.dht_record() == {"shard_above": 4, "owner_wait_s": 2.5, "aggregate_codec": "identity"}
    assert parse_run_file(plain).dht.shard_above == 0  # sharding is opt-in (docs/serverless.md, "Sharded rounds")
    for bad in ("shard_above = -1", "owner_wait_s = 0", "shard_above = 2.5", "parts = 3"):
        with pytest.raises(ConfigError):
            parse_run_file(plain + f"\n[dht]\n{bad}\n")
