"""kill -9 of one node mid-run: its round closes at the deadline with the other two, its lease expires,
and the run goes on with two."""
from __future__ import annotations

from pathlib import Path

import pytest

from lowband_cluster import (Cluster, applied_rounds, check_replicas, member_names, rounds_table, status,
                             terminate, wait_for, write_run_file)

SURVIVORS = ["n0", "n2"]


@pytest.mark.timeout(120)
def test_killed_node_is_dropped_and_the_run_goes_on(cluster: Cluster, tmp_path: Path) -> None:
    # The run is longer than the test: the survivors are stopped once the outcome is visible.
    # max_wait_s 1.5 < lease_s 5: a round missing the dead node's payload closes at its deadline before
    # the lease runs out, so both ways of dropping a dead node are exercised.
    run = write_run_file(tmp_path / "run.toml", rounds=1000, min_nodes=2, lease_s=5.0, min_wait_s=1.0,
                         max_wait_s=1.5)
    coord = cluster.coordinator(run, tmp_path / "state")
    n0, victim, n2 = (cluster.node(coord.address, name) for name in ("n0", "n1", "n2"))

    def all_contributed_and_round_1_committed() -> bool:
        # Every node must be in the run (one may have joined late, for a later first round): then the open
        # round expects all three and the survivors alone can close it at its deadline.
        for p in (n0, victim, n2):
            assert p.alive(), f"{p.name} exited early with {p.popen.returncode}"
        in_run = all(any(e["contributed"] for e in applied_rounds(p.workdir)) for p in (n0, victim, n2))
        return in_run and status(coord.address).committed_rounds >= 2

    wait_for("every node to contribute and round 1 to commit", all_contributed_and_round_1_committed, timeout_s=60,
             interval_s=0.05)
    victim.kill9()
    last_applied = applied_rounds(victim.workdir)[-1]["round"]  # final: the process is gone

    wait_for("n1's lease to expire", lambda: member_names(coord.address) == set(SURVIVORS), timeout_s=30)
    after_expiry = status(coord.address).committed_rounds
    wait_for("three more rounds with two nodes", lambda: status(coord.address).committed_rounds >= after_expiry + 3,
             timeout_s=30)
    assert n0.alive() and n2.alive()
    assert terminate(n0, n2) == [0, 0]
    assert terminate(coord) == [0]

    rows = rounds_table(tmp_path / "state")
    check_replicas({"n0": n0.workdir, "n1": victim.workdir, "n2": n2.workdir}, rows)
    assert any("n1" in row.members for row in rows[:last_applied + 1])
    # The round n1 was in when it died may hold its payload (if it submitted before dying); none later does.
    later = [row for row in rows if row.round > last_applied + 1 and row.round < after_expiry + 3]
    assert later, rows
    for row in later:
        assert row.members == SURVIVORS, row
    dropped = [row for row in rows if row.round > last_applied and row.members == SURVIVORS]
    assert dropped[0].reason.startswith("deadline passed with 2/3 payloads"), dropped[0]
    assert any(row.reason == "all 2 live members submitted" for row in dropped), [r.reason for r in dropped]
    assert "lease expired: n1: no heartbeat" in coord.log_text()
