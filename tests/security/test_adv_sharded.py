"""Adversarial checks of the sharded serverless reduce (node/transport/dht_sharded.py, dht_shards.py): one peer of
the run against the others. The real-p2pd tests use tests/dht_harness.py's three peers with ``shard_above = 2``."""
from __future__ import annotations

import asyncio
import time
import types
from typing import Any

import pytest
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time

from node import wire
from node.transport.dht_faults import DhtFaults, Stream
from node.transport.dht_frames import FramePool, digest
from node.transport.dht_sharded import ShardedReduce
from node.transport.dht_shards import ShardCodec, ShardEntry, members_digest

from dht_harness import collect_all, no_orphaned_p2pd, peers, setup, workers

__all__ = ["no_orphaned_p2pd", "setup"]  # fixtures

SHARDED: dict[str, Any] = {"shard_above": 2, "owner_wait_s": 1.0, "fetch_timeout_s": 5.0}


class _Writer:
    """The writer side of a stream, in memory."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, b: bytes) -> None:
        self.data += b

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        return None


def _request(round_: int, sha: bytes, members: int, shard: int) -> bytes:
    body = round_.to_bytes(8, "big") + sha + members.to_bytes(4, "big") + shard.to_bytes(4, "big")
    return len(body).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + body


def test_slice_requests_for_rounds_never_held_leave_no_state_behind() -> None:
    """Anyone who can open the ``lowband.{run}.slice`` stream names an arbitrary 8-byte round: ``serve`` adds a
    ``frames.served`` entry for it even when it serves nothing, and ``FramePool._prune`` only drops rounds it holds
    frames of, so distinct far-future rounds grow that dict without bound (one entry per request)."""
    frames = FramePool("w0", "lowband.run.frame", fetch_timeout_s=1.0)
    transport = types.SimpleNamespace(run_id="run", name="w0", frames=frames, faults=DhtFaults())
    reduce = ShardedReduce(transport, shard_above=2)  # type: ignore[arg-type]

    async def ask(n: int) -> None:
        for i in range(n):
            reader = asyncio.StreamReader()
            reader.feed_data(_request((1 << 62) + i, b"\x11" * 32, 3, 0))
            reader.feed_eof()
            await reduce.serve(None, reader, _Writer())  # type: ignore[arg-type]

    asyncio.run(ask(2000))
    assert len(frames.served) == 0, f"{len(frames.served)} rounds recorded as served, nothing was"


@pytest.mark.usefixtures("no_orphaned_p2pd")
@pytest.mark.timeout(240)
def test_a_well_formed_forged_shard_aggregate_from_a_high_ranked_member_is_not_applied(
        setup: tuple[Any, Any]) -> None:
    """w2 (rank 2 in shard 0's fallback order) publishes at once, under its own signed shard record, a *valid*
    aggregate of shard 0 that is not the agreed one (the reduce of its own slice alone); shard 0's owner w0 computes
    nothing (withhold_shards). The rule is that w1 (rank 1) recomputes shard 0 after owner_wait_s, and a rank-2
    copy is taken only once ranks 0 and 1 had their time: readers take the lowest-ranked copy *present*, at any time,
    so every peer applies w2's forgery and nobody recomputes."""
    ws = workers(setup)
    faults = {"w0": DhtFaults().withhold_shards()}
    with peers("run-sharded-forged-valid", faults=faults, **SHARDED) as ts:
        frames = {}
        for w, t in zip(ws, ts):
            w.train()
            frames[t.name] = w.prepare(0)
        codec = ShardCodec.from_frame(frames["w2"])
        plan = codec.plan(3)
        opened = {n: codec.open_slice(codec.slice(codec.open_own(f, 0, n), plan, 0, None), 0, n, plan, 0, None)
                  for n, f in frames.items()}
        honest = codec.reduce([opened[n] for n in sorted(opened)], plan, 0)
        forged = codec.reduce([opened["w2"]], plan, 0)  # well-formed: it opens as a shard-0 aggregate
        assert forged != honest
        codec.open_aggregate(forged, 0, plan, 0)
        sha = ts[2].frames.add(0, forged)
        pairs = {(n, digest(f)) for n, f in frames.items()}
        assert ts[2]._store(f"{ts[2].run_id}/round/0/shard",
                            [ShardEntry(0, 3, len(forged), sha, members_digest(pairs)).encode()], get_dht_time() + 60)
        for t in ts:
            t.submit(0, frames[t.name])
        results = collect_all(ts, 0, timeout_s=60.0)
        want = codec.open_aggregate(honest, 0, plan, 0)
        for name, res in results.items():
            assert res.committed, (name, res.reason)
            applied = wire.unpack(res.aggregate, codec.aggregate, codec.spec, codec.run_id, 0,
                                  extra_spec=codec.extra_spec, sender="coordinator")
            for spec in codec.sub_spec(plan, 0)[0]:
                for k, v in want.tensors[spec.name].items():
                    assert bool((applied.tensors[spec.name][k] == v).all()), \
                        f"{name} applied a shard-0 aggregate other than the agreed members' ({spec.name}/{k})"


@pytest.mark.usefixtures("no_orphaned_p2pd")
@pytest.mark.timeout(240)
def test_one_member_stalling_its_slices_does_not_hold_every_peer_for_a_fetch_timeout_per_shard(
        setup: tuple[Any, Any]) -> None:
    """w2 answers every slice request and then sends nothing (a stalled stream; it computes and publishes every
    shard itself, honestly). ``adopt`` computes every shard a peer is eligible for one after the other *before* it
    reads the published records, and each attempt waits ``fetch_timeout_s`` for w2's slice: w0 and w1 spend
    ~3 × fetch_timeout_s (N × fetch_timeout_s with N shards, up to the round's deadline) although every aggregate
    is published and fetchable after the first."""
    ws = workers(setup)
    faults = {"w2": DhtFaults().stall(Stream.SLICE, after_pieces=0)}
    with peers("run-sharded-stalled-slice", faults=faults, shard_above=2, owner_wait_s=1.0,
               fetch_timeout_s=4.0) as ts:
        for w, t in zip(ws, ts):
            w.train()
            t.submit(0, w.prepare(0))
        began = time.monotonic()
        results = collect_all(ts, 0, timeout_s=40.0)
        took = time.monotonic() - began
        assert any(f.startswith("stall") for f in faults["w2"].fired), faults["w2"].fired
        assert results["w2"].committed, results["w2"].reason
        for name in ("w0", "w1"):
            assert results[name].committed, (name, results[name].status, results[name].reason)
        assert len({results[n].aggregate for n in ("w0", "w1", "w2")}) == 1
        # the agreement (~round_wait_s), one slice timeout, fetching the published aggregates: not one timeout per shard
        assert took < 4.0 + 5.0, f"the round took {took:.1f} s"
