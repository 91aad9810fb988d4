"""No orphans: a serverless node's hivemind processes — the forked DHT process and its p2pd — die with the node, and a
``lowband dht`` peer's with it, even when only the main process is killed with -9 (nothing gets to shut them down:
``node/transport/dht_process.py``). Real processes on 127.0.0.1."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from dht_runs import command, descendants, running, signed_run
from lowband_cluster import Cluster, Proc, dht_node, dht_peer, wait_for


def hivemind_processes(proc: Proc) -> set[int]:
    """``proc``'s DHT process (a fork: the same command line) and its p2pd."""
    mine = command(proc.pid)
    found = {p for p in descendants(proc.pid) if "p2pd" in command(p) or command(p) == mine}
    assert any("p2pd" in command(p) for p in found) and any(command(p) == mine for p in found), \
        {p: command(p) for p in descendants(proc.pid)}
    return found


@pytest.mark.timeout(240)
def test_kill_9_of_a_node_or_of_the_bootstrap_peer_leaves_no_dht_process_or_p2pd(
        cluster: Cluster, tmp_path: Path) -> None:
    run = signed_run(tmp_path / "run.toml", open_run=True, rounds=10_000, H=2, min_nodes=1, run_id="it-orphans")
    boot, maddr = dht_peer(cluster)
    node = dht_node(cluster, maddr, "n0", run)
    wait_for("n0's DHT to start", lambda: "DHT address" in node.log_text(), 120)
    for proc in (node, boot):
        left = hivemind_processes(proc)
        os.kill(proc.pid, signal.SIGKILL)  # the main process alone, not its process group
        proc.popen.wait(timeout=30)
        wait_for(f"{proc.name}'s DHT process and p2pd to exit",
                 lambda left=left: not any(running(p) for p in left), 20)
