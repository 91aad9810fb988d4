"""The short soak: a seeded churn schedule (kills and restarts, SIGSTOP pauses, a join, a partition of one node's
link, a coordinator kill and restart) against a run on the ``home`` link profile, then the invariants checked by
``lowband bench soak`` itself (node/bench/soak.py): nobody crashed, every round applied exactly once by every
member, replicas identical to the coordinator's. The long version (6 nodes, 100 rounds, ≥ 20 events, 2
coordinator restarts) is ``lowband bench soak``; its result is in BENCHMARKS.md."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from node.bench.soak import SoakConfig, run_soak


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("mode", ["coordinator", "dht"])
def test_short_soak_keeps_every_invariant(tmp_path: Path, mode: str) -> None:
    cfg = SoakConfig(mode=mode, nodes=4, rounds=24, events=6, coordinator_restarts=1, profile="home", seed=3,
                     H=2, timeout_s=360.0)
    report = run_soak(cfg, root=tmp_path / "soak")
    actions = Counter(e["action"] for e in report.schedule)
    assert actions["kill"] and actions["restart"] and actions["pause"] and actions["join"] and actions["partition"]
    if mode == "coordinator":
        assert actions["coordinator_kill"] == actions["coordinator_restart"] == 1
    assert report.problems == [], "\n".join(report.problems)
    assert report.committed_rounds >= cfg.rounds
    joiner = next(e["target"] for e in report.schedule if e["action"] == "join")
    assert report.applied.get(joiner, 0) > 0, report.applied  # the node that joined mid-run contributed rounds
    assert len(report.survivors) >= cfg.nodes, report.survivors  # kills were followed by restarts
    assert all(report.exit_codes[n] in (0, -15) for n in report.survivors), report.exit_codes  # -15: still starting
    assert report.final_val_loss == report.final_val_loss  # evaluated (not NaN)
