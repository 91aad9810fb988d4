"""A fourth node joins a running run: it fetches the state, contributes from the next round on, and its
replica matches everyone's."""
from __future__ import annotations

from pathlib import Path

import pytest

from lowband_cluster import (Cluster, applied_rounds, check_replicas, read_log, rounds_table, status, terminate,
                             wait_for, write_run_file)

FIRST = ["n0", "n1", "n2"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_fourth_node_joins_at_round_3(cluster: Cluster, tmp_path: Path, overlap: bool) -> None:
    # The run is longer than the test: everyone is stopped once the joiner applied three rounds.
    # min_wait_s 5: a round waits for the joiner's first payload however slowly it fetches the state.
    run = write_run_file(tmp_path / "run.toml", rounds=1000, min_nodes=3, min_wait_s=5.0, overlap=overlap)
    coord = cluster.coordinator(run, tmp_path / "state")
    nodes = [cluster.node(coord.address, name) for name in FIRST]

    def committed_3() -> bool:
        for p in nodes:
            assert p.alive(), f"{p.name} exited early with {p.popen.returncode}"
        return status(coord.address).committed_rounds >= 3

    wait_for("round 2 to commit", committed_3, timeout_s=60, interval_s=0.05)
    joiner = cluster.node(coord.address, "n3")

    def joiner_contributed_3() -> bool:
        assert joiner.alive(), f"n3 exited with {joiner.popen.returncode}"
        return sum(1 for e in applied_rounds(joiner.workdir) if e["contributed"]) >= 3

    wait_for("n3 to contribute to three rounds", joiner_contributed_3, timeout_s=60)
    assert terminate(*nodes, joiner) == [0, 0, 0, 0]
    assert terminate(coord) == [0]

    rows = rounds_table(tmp_path / "state")
    log = read_log(joiner.workdir)
    # a fresh node downloads the state while it starts up, then checks it like any state; if the run moved on
    # past the rounds the coordinator still holds results for (tiny rounds here), it takes the newer state too
    assert log[0]["event"] == "state" and log[0]["why"] == "join, downloaded while starting up", log[0]
    last = max(i for i, e in enumerate(log) if e.get("event") == "state")
    assert all(e["why"] == "catching up: round result gone" for e in log[1:last + 1] if e.get("event")), log
    assert all(e.get("event") == "state" or e.get("observed") for e in log[:last]), log
    state, log = log[last], log[last:]
    start = state["committed_rounds"]
    assert start >= 3, state
    assert state["fingerprint"] == rows[start - 1].fingerprint  # the state after round start-1
    # the newest state at once, then the rounds that closed meanwhile applied without contributing, then its own
    contributed = [e for e in log[1:] if e["contributed"]]
    first = contributed[0]["round"]
    caught_up = [e for e in log[1:] if e["round"] < first]
    assert [e["round"] for e in caught_up] == list(range(start, first)), log
    assert all(e.get("observed") for e in caught_up), caught_up
    # with overlap the joiner trains its first round from when the others start it, the round before observed in
    # flight (node/daemon.py, _step_in); without overlap it trains the open round at once
    stepped_in = [e["round"] for e in caught_up if e.get("overlapped")]
    assert stepped_in == ([first - 1] if overlap else []), caught_up
    assert [e["round"] for e in contributed[:3]] == [first, first + 1, first + 2], contributed
    for row in rows[:first]:
        assert "n3" not in row.members, row
    for row in rows[first:first + 3]:
        assert row.members == FIRST + ["n3"], row
    fingerprints = check_replicas({p.name: p.workdir for p in nodes + [joiner]}, rows)
    assert all(fingerprints[e["round"]] == e["fingerprint"] for e in log[1:])
