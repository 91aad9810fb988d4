"""Sharded rounds between real peers (node/transport/dht_sharded.py): three DhtTransports in one process with
``shard_above = 2``, so every round of the three is reduced by shard — each peer owns one shard, fetches its slices
from the others, serves its signed shard aggregate, and assembles the round's aggregate from the others'. The plan
and the reduce's equivalence with the all-gather are tested without a network in test_dht_shards.py."""
from __future__ import annotations

from typing import Any

import pytest

from hivemind.utils import get_dht_time

from node.transport.dht_faults import DhtFaults, Stream
from node.transport.dht_frames import digest
from node.transport.dht_shards import ShardEntry, members_digest

from dht_harness import NAMES, collect_all, peers, workers

pytestmark = pytest.mark.usefixtures("no_orphaned_p2pd")
SHARDED: dict[str, Any] = {"shard_above": 2, "owner_wait_s": 1.0, "fetch_timeout_s": 5.0}


def _play(ws: list[Any], ts: list[Any], r: int) -> dict[str, Any]:
    for w, t in zip(ws, ts):
        w.train()
        t.submit(r, w.prepare(r))
    return collect_all(ts, r, timeout_s=60.0)


def _applied_identically(ws: list[Any], results: dict[str, Any]) -> None:
    aggregates = {res.aggregate for res in results.values()}
    assert len(aggregates) == 1 and None not in aggregates  # one aggregate frame, the same bytes on every peer
    for res in results.values():
        assert res.committed, res.reason
        assert res.members == NAMES and not res.payloads
    reports = [w.apply(results[w.name]) for w in ws]
    assert all(rep.committed and rep.contributed for rep in reports)
    assert len({w.fingerprint() for w in ws}) == 1


@pytest.mark.timeout(180)
def test_three_peers_reduce_by_shard_each_computing_its_own_and_apply_the_same_aggregate(
        setup: tuple[Any, Any]) -> None:
    ws = workers(setup)
    with peers("run-sharded", **SHARDED) as ts:
        for r in range(2):
            results = _play(ws, ts, r)
            _applied_identically(ws, results)
            for i, t in enumerate(ts):  # every owner computed its own shard (a slow one may have been replaced too)
                assert i in t.sharded.computed[r]
            for t in ts:  # a peer's download: its slices from two peers and two aggregates, never a whole frame
                frame = len(t.frames.latest_own(r)[1])
                assert 0 < results[t.name].bytes_received < 2 * frame


@pytest.mark.timeout(180)
def test_an_owner_that_computes_nothing_is_replaced_by_the_next_member_and_the_round_completes(
        setup: tuple[Any, Any]) -> None:
    """w1 owns shard 1 but dies (as far as the reduce goes) once the round is agreed: after owner_wait_s, w2 — next
    in shard 1's fallback order — computes it, and every peer (w1 too) commits the same aggregate."""
    ws = workers(setup)
    faults = {"w1": DhtFaults().withhold_shards()}
    with peers("run-sharded-dead-owner", faults=faults, **SHARDED) as ts:
        results = _play(ws, ts, 0)
        _applied_identically(ws, results)
        assert "withhold shards" in faults["w1"].fired
        assert 1 not in ts[1].sharded.computed.get(0, [])
        assert sorted(ts[2].sharded.computed[0]) == [1, 2]  # its own, and w1's in its place


@pytest.mark.timeout(180)
def test_an_aggregate_served_other_than_published_is_rejected_and_computed_again(setup: tuple[Any, Any]) -> None:
    """w0 serves its shard aggregate with other bytes than its signed record names (a forged or corrupted partial
    sum): the others refuse it, the next member of shard 0's fallback order computes it, every peer commits the
    honest aggregate."""
    ws = workers(setup)
    faults = {"w0": DhtFaults().corrupt(Stream.FRAME)}
    with peers("run-sharded-forged", faults=faults, **SHARDED) as ts:
        results = _play(ws, ts, 0)
        _applied_identically(ws, results)
        assert "corrupt frame" in faults["w0"].fired
        assert 0 in ts[1].sharded.computed[0]  # w1 computed shard 0 again after refusing w0's copy


@pytest.mark.timeout(180)
def test_a_forged_shard_record_and_its_aggregate_are_refused_by_every_reader(setup: tuple[Any, Any]) -> None:
    """w2 publishes, under its own signed shard record, an "aggregate" of shard 0 that is not one (and computes
    nothing else); w0, shard 0's owner, computes nothing either. A reader that fetches w2's bytes (they match the
    record's sha256) refuses them; every peer applies the aggregate w1 computes in the owners' place."""
    ws = workers(setup)
    faults = {"w0": DhtFaults().withhold_shards(), "w2": DhtFaults().withhold_shards()}
    with peers("run-sharded-forged-record", faults=faults, **SHARDED) as ts:
        frames = {}
        for w, t in zip(ws, ts):
            w.train()
            frames[t.name] = w.prepare(0)
        forged = b"\x00" * 64
        sha = ts[2].frames.add(0, forged)  # served by w2's frame stream, as an aggregate would be
        pairs = {(n, digest(f)) for n, f in frames.items()}
        assert ts[2]._store(f"{ts[2].run_id}/round/0/shard",
                            [ShardEntry(0, 3, len(forged), sha, members_digest(pairs)).encode()], get_dht_time() + 60)
        for t in ts:
            t.submit(0, frames[t.name])
        results = collect_all(ts, 0, timeout_s=60.0)
        _applied_identically(ws, results)
        assert sorted(ts[1].sharded.computed[0]) == [0, 1, 2]
        # w2's record (rank 2 of shard 0) is not taken before 2 × owner_wait_s, by when w1 (rank 1) has computed
        # shard 0 and published it: a reader may fetch w2's bytes only if w1's copy is late, and then refuses them
        # (tests/security/test_adv_sharded.py: a *well-formed* forgery published at once is not taken either)
