"""The coordinator with a hostile member (docs/algorithms.md §11): frames signed by the key a member joined with and
relayed with the members' keys; with the recommended ``[recipe.reduce]`` a member sending huge, well-formed, correctly
signed frames is rejected by the coordinator and by every node alike, evicted with the reason logged and shown in
Status, refused at Join, and the honest replicas stay bit-identical to the coordinator with sane losses."""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

import pytest
import torch

from core_harness import Clock, Harness
from coordinator.errors import Evicted
from node import wire
from node.recipes import get_recipe
from node.roundlog import coordinator_rounds
from node.robust.defaults import untrusted_overrides
from node.train.worker import Worker
from node.transport.messages import RoundResult, RoundStatus

HONEST = ("a", "b", "c")
SCALE = 1e25


def _loud(h: Harness, worker: Worker, round_: int) -> bytes:
    """The attacker's frame: its worker's own update with every magnitude × 1e25, signed with its key."""
    worker.train()
    ref = h.core.reference
    env = wire.unpack(worker.prepare(round_), ref.codec, ref.spec, h.cfg.run.run_id, round_)
    loud = {n: {k: (v * SCALE if k in ref.codec.magnitude_buffers(enc) else v) for k, v in enc.items()}
            for n, enc in env.tensors.items()}
    return wire.pack(h.cfg.run.run_id, round_, "m", ref.codec, ref.spec, loud, key=h.key("m"))


@pytest.fixture
def hostile(make: Callable[..., Harness]) -> Harness:
    reduce = untrusted_overrides(get_recipe("sign")) | {"reduce.evict_after": 2}
    return make({"recipe": {"H": 1, **reduce}, "membership": {"min_nodes": 3, "max_nodes": 4}})


def test_a_member_sending_huge_frames_is_dropped_evicted_and_refused(hostile: Harness, clock: Clock,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    h = hostile
    joins = {name: h.join(name) for name in (*HONEST, "m")}
    workers = {name: h.worker(name, joins[name]) for name in joins}
    losses: list[float] = []
    caplog.set_level(logging.WARNING, logger="coordinator")
    for r in range(3):
        for name in HONEST:
            stats = workers[name].train()
            losses.append(stats.mean_loss)
            h.submit(name, r, workers[name].prepare(r), loss=stats.mean_loss)
        if "m" in {m.name for m in h.core.members.values()}:
            h.submit("m", r, _loud(h, workers["m"], r))
        result, _ = h.core.collect(h.ids["a"], r, 0.0, True)
        assert result.keys == {n: h.key(n).public for n in result.frames}  # relayed with the result
        for name in HONEST:
            report = workers[name].apply(RoundResult(r, RoundStatus.COMMITTED, result.frames,
                                                     member_keys=result.keys))
            assert report.committed and report.contributed
            assert workers[name].fingerprint() == result.fingerprint == h.core.reference.fingerprint()
        clock.advance(1.0)
    rows = coordinator_rounds(h.store.dir)
    assert [sorted(row.members) for row in rows] == [["a", "b", "c", "m"], ["a", "b", "c", "m"], ["a", "b", "c"]]
    for row in rows[:2]:
        m = row.robust["members"]["m"]
        assert "absurd, rejected" in m["rejected"] and m["norm_ratio"] > 1e20
        assert all("rejected" not in row.robust["members"][n] for n in HONEST)
    assert rows[1].robust["evicted"] == {"m": "2 of its last 2 frames were clipped or rejected (reduce.evict_after 2 "
                                                 "of 8)"}
    assert "m" not in {m.name for m in h.core.members.values()}
    assert any("leave m" in r.message and "evicted at round 1" in r.message for r in caplog.records)
    with pytest.raises(Evicted, match=r"m \(key [0-9a-f]{16}\) was evicted from this run: at round 1: 2 of its last"):
        h.join("m")
    with pytest.raises(Evicted, match="was evicted from this run"):  # the same key under another name
        h.join("m2", key=h.key("m"))
    status = h.core.status()
    record = status["records"]["m"]
    assert (record.frames, record.rejected, record.clipped, record.evicted_at) == (2, 2, 0, 1)
    assert status["records"]["a"].frames == 3 and status["records"]["a"].rejected == 0
    assert all(math.isfinite(x) and x < math.log(256) + 0.5 for x in losses)
    assert all(float(t.abs().max()) < 10.0 for t in h.core.reference.tensors)


def test_the_servicer_shows_accountability_in_status(hostile: Harness) -> None:
    from coordinator.servicer import _accountability

    h = hostile
    for name in (*HONEST, "m"):
        h.join(name)
    for name in HONEST:
        h.submit(name, 0)
    h.submit("m", 0, _loud(h, h.worker("m", {"shard": 3, "num_shards": 4}), 0))
    fields: dict[str, Any] = _accountability(h.core.status()["records"]["m"])
    assert (fields["frames_seen"], fields["frames_rejected"], fields["frames_clipped"]) == (1, 1, 0)
    assert fields["norm_ratio"] > 1e20 and -1.0 <= fields["cosine"] <= 1.0
    assert torch.isnan(torch.tensor(_accountability(None)["norm_ratio"]))
