"""A node whose run file differs from the coordinator's is refused with a message naming the field, and the
run goes on without it."""
from __future__ import annotations

from pathlib import Path

import pytest

from lowband_cluster import Cluster, member_names, status, terminate, wait_for, write_run_file


@pytest.mark.timeout(120)
def test_node_with_another_run_file_is_refused_and_the_run_goes_on(cluster: Cluster, tmp_path: Path) -> None:
    run = write_run_file(tmp_path / "run.toml", rounds=1000, min_nodes=2, H=2)
    other = write_run_file(tmp_path / "other.toml", rounds=1000, min_nodes=2, H=3)
    coord = cluster.coordinator(run, tmp_path / "state")
    nodes = [cluster.node(coord.address, name) for name in ("n0", "n1")]

    def committed(n: int):
        def probe() -> bool:
            for p in nodes:
                assert p.alive(), f"{p.name} exited early with {p.popen.returncode}"
            return status(coord.address).committed_rounds >= n
        return probe

    wait_for("round 1 to commit", committed(2), timeout_s=60)
    odd = cluster.node(coord.address, "odd", "--run", str(other))
    assert odd.wait_exit(timeout_s=60) == 3
    text = odd.log_text()
    assert "join refused" in text and "recipe.H: 3 vs 2" in text, text[-3000:]
    assert not (odd.workdir / "rounds.jsonl").exists()

    after = status(coord.address).committed_rounds
    wait_for("three more rounds after the refusal", committed(after + 3), timeout_s=30)
    assert member_names(coord.address) == {"n0", "n1"}
    assert "recipe.H" in coord.log_text()
    assert terminate(*nodes) == [0, 0]
