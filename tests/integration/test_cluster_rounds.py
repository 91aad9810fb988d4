"""A coordinator and three nodes as real processes: every round commits with everyone, replicas identical —
also with overlapped rounds (each round's exchange runs while the next one trains)."""
from __future__ import annotations

from pathlib import Path

import pytest

from lowband_cluster import (Cluster, check_replicas, read_log, rounds_table, status, terminate, wait_all_exit,
                             write_run_file)

NAMES = ["n0", "n1", "n2"]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("recipe,overlap", [("sign", False), ("dct-consistent", False), ("sign", True)])
def test_three_nodes_commit_every_round_with_identical_replicas(cluster: Cluster, tmp_path: Path,
                                                                recipe: str, overlap: bool) -> None:
    rounds = 6
    # min_nodes = 3: the run starts only once all three joined, so round 0 has everyone however the
    # processes' start-up interleaves; after that a round closes when all three submitted.
    run = write_run_file(tmp_path / "run.toml", recipe=recipe, rounds=rounds, min_nodes=3, overlap=overlap)
    coord = cluster.coordinator(run, tmp_path / "state")
    nodes = [cluster.node(coord.address, name) for name in NAMES]

    codes = wait_all_exit(nodes, timeout_s=110)
    assert codes == [0, 0, 0], codes
    s = status(coord.address)
    assert s.recipe == recipe and s.committed_rounds == rounds and s.current_round == rounds
    assert [r.round for r in s.recent_rounds] == list(range(rounds))
    assert terminate(coord) == [0]

    rows = rounds_table(tmp_path / "state")
    assert [r.round for r in rows] == list(range(rounds))
    for row in rows:
        assert row.members == NAMES, row
        assert row.reason == "all 3 live members submitted", row
    assert [r.reference_fingerprint for r in s.recent_rounds] == [r.fingerprint for r in rows]
    assert s.reference_fingerprint == rows[-1].fingerprint

    workdirs = {n.name: n.workdir for n in nodes}
    fingerprints = check_replicas(workdirs, rows)
    assert sorted(fingerprints) == list(range(rounds))  # every round was applied (by every node: below)
    assert len(set(fingerprints.values())) == rounds  # the reference moved every round
    for name, wd in workdirs.items():
        log = read_log(wd)
        assert [e["round"] for e in log] == list(range(rounds)), (name, log)  # no state adoption needed
        assert all(e["contributed"] for e in log), (name, log)
        assert (wd / "checkpoint.safetensors").is_file()
