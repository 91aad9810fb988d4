"""kill -9 of the coordinator mid-round, restarted with the same command on the same state dir: the run
resumes where it was, no round is skipped or applied twice, and every replica ends identical."""
from __future__ import annotations

from pathlib import Path

import pytest

from lowband_cluster import (Cluster, applied_rounds, check_replicas, rounds_table, status, terminate, wait_all_exit,
                             wait_for, write_run_file)

NAMES = ["n0", "n1", "n2"]


@pytest.mark.timeout(150)
def test_coordinator_killed_and_restarted_resumes_the_run(cluster: Cluster, tmp_path: Path) -> None:
    rounds = 14
    run = write_run_file(tmp_path / "run.toml", rounds=rounds, min_nodes=3)
    # Port 0: the state dir remembers the port the coordinator bound, and the restarted one binds it again, so it is
    # where the nodes keep calling (no free-port guess that another process could take meanwhile).
    coord = cluster.coordinator(run, tmp_path / "state", listen="127.0.0.1:0")
    nodes = [cluster.node(coord.address, name) for name in NAMES]

    def mid_round() -> bool:
        for p in nodes:
            assert p.alive(), f"{p.name} exited early with {p.popen.returncode}"
        s = status(coord.address)
        return s.committed_rounds >= 2 and len(s.submitted) > 0  # some payloads of the open round are held

    wait_for("round 1 to commit and the next round to collect payloads", mid_round, timeout_s=60, interval_s=0.02)
    coord.kill9()
    killed_at = max(len(applied_rounds(p.workdir)) for p in nodes)
    assert killed_at < rounds, "the run ended before the coordinator was killed"

    coord2 = cluster.coordinator(run, tmp_path / "state", listen="127.0.0.1:0")
    assert coord2.address == coord.address
    assert wait_all_exit(nodes, timeout_s=100) == [0, 0, 0]
    s = status(coord2.address)
    assert s.committed_rounds == rounds
    assert terminate(coord2) == [0]
    assert "resumed run it-sign after" in coord2.log_text()

    rows = rounds_table(tmp_path / "state")
    assert [r.round for r in rows] == list(range(rounds))
    check_replicas({p.name: p.workdir for p in nodes}, rows)  # consecutive rounds, no repeats, same digests
    finals = {p.name: applied_rounds(p.workdir)[-1] for p in nodes}
    assert {e["round"] for e in finals.values()} == {rounds - 1}, finals
    assert {e["fingerprint"] for e in finals.values()} == {rows[-1].fingerprint} == {s.reference_fingerprint}
