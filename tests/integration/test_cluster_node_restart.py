"""SIGTERM makes a node leave at once, checkpoint and exit 0; the same command with the same workdir later
resumes it (checkpoint, then the rounds it missed: from their results while the coordinator holds them, else the
state) and it keeps a replica identical to everyone's."""
from __future__ import annotations

from pathlib import Path

import pytest

from lowband_cluster import (Cluster, applied_rounds, check_replicas, member_names, read_log, rounds_table, status,
                             terminate, wait_all_exit, wait_for, write_run_file)


@pytest.mark.timeout(180)
def test_sigterm_leaves_checkpoints_and_a_restart_resumes(cluster: Cluster, tmp_path: Path) -> None:
    # A long lease proves the departure is the Leave RPC, not lease expiry.
    run = write_run_file(tmp_path / "run.toml", rounds=9, min_nodes=2, H=2, lease_s=60.0, max_wait_s=2.0)
    coord = cluster.coordinator(run, tmp_path / "state")
    n0, n1, n2 = (cluster.node(coord.address, name) for name in ("n0", "n1", "n2"))
    wait_for("two rounds with n1", lambda: len(applied_rounds(n1.workdir)) >= 2 or None, timeout_s=90)

    assert terminate(n1) == [0]
    assert (n1.workdir / "checkpoint.safetensors").exists()
    assert "n1" not in member_names(coord.address)  # gone at once, 60 s before its lease would expire
    assert "leave n1" in coord.log_text()
    left_after = applied_rounds(n1.workdir)[-1]["round"]
    wait_for("a round without n1", lambda: status(coord.address).committed_rounds >= left_after + 3 or None,
             timeout_s=60)

    again = cluster.node(coord.address, "n1")  # same name → same workdir
    assert again.workdir == n1.workdir
    codes = wait_all_exit([n0, n2, again], timeout_s=120)
    assert codes == [0, 0, 0]
    text = again.log_text()
    assert "resumed from checkpoint" in text or "adopted state" in text, text[-2000:]
    log = read_log(again.workdir)
    start = max(i for i, e in enumerate(log) if e.get("event") == "resumed")
    # the rounds it missed, caught up on: observed from their results (a few rounds: the coordinator holds them)
    caught_up = [e["round"] for e in log[start:] if e.get("observed")]
    adopted = [e["committed_rounds"] for e in log[start:] if e.get("event") == "state"]
    assert max(caught_up + [c - 1 for c in adopted], default=-1) > left_after + 1, log
    terminate(coord)
    fingerprints = check_replicas({"n0": n0.workdir, "n1": n1.workdir, "n2": n2.workdir},
                                  rounds_table(tmp_path / "state"))
    assert len(fingerprints) == 9


@pytest.mark.timeout(180)
def test_checkpoint_every_n_rounds_and_a_crash_restart_fetches_what_the_checkpoint_lacks(
        cluster: Cluster, tmp_path: Path) -> None:
    """``--checkpoint-every 3``: after kill -9 the checkpoint holds a multiple of 3 rounds (never a torn file); the
    restarted node starts from it, catches up on the rounds since — from their results while the coordinator holds
    them, else by downloading the state — and keeps an identical replica."""
    from node.train import state_file

    run = write_run_file(tmp_path / "run.toml", rounds=100_000, min_nodes=2, H=2, lease_s=3.0, max_wait_s=2.0)
    coord = cluster.coordinator(run, tmp_path / "state")
    n0 = cluster.node(coord.address, "n0")
    n1 = cluster.node(coord.address, "n1", "--checkpoint-every", "3")
    wait_for("n1 to apply five rounds", lambda: len(applied_rounds(n1.workdir)) >= 5 or None, timeout_s=90)
    n1.kill9()
    applied = len(applied_rounds(n1.workdir))
    header = state_file.parse((n1.workdir / "checkpoint.safetensors").read_bytes()).header
    assert header["kind"] == "checkpoint" and header["node"] == "n1"
    saved = header["committed_rounds"]
    first = applied_rounds(n1.workdir)[0]["round"]
    # written after its 3rd, 6th… applied round (rounds first…first+2 applied → first+3 committed)
    assert (saved - first) % 3 == 0 and first + 3 <= saved <= first + applied, (saved, first, applied)
    wait_for("n1's lease to expire", lambda: member_names(coord.address) == {"n0"} or None, timeout_s=30)
    again = cluster.node(coord.address, "n1", "--checkpoint-every", "3")
    wait_for("n1 to contribute again", lambda: any(e["contributed"] for e in applied_rounds(again.workdir)[applied:])
             or None, timeout_s=90)
    assert terminate(n0, again) == [0, 0]
    assert terminate(coord) == [0]
    log = read_log(again.workdir)
    resumed = [i for i, e in enumerate(log) if e.get("event") == "resumed"]
    assert resumed and log[resumed[-1]]["committed_rounds"] == saved, log
    assert any((e.get("event") == "state" and e["committed_rounds"] > saved) or (e.get("observed") and e["round"] >= saved)
               for e in log[resumed[-1]:]), log
    # killed: restarted from its checkpoint, n1 may catch up on a round it had contributed to before the kill
    check_replicas({"n0": n0.workdir, "n1": n1.workdir}, rounds_table(tmp_path / "state"), killed={"n1"})
