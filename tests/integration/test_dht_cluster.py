"""Serverless mode end to end: a ``lowband dht`` bootstrap peer and three ``lowband node --dht`` processes on
127.0.0.1 (NAT traversal off) train a tiny run to the end with identical replicas; a node with another run file
is refused naming the field, and a node arriving after the run started is refused (no state transfer yet)."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from lowband_cluster import Cluster, Proc, applied_rounds, check_round_sequence, read_log, wait_all_exit, \
    wait_for, write_run_file

ROUNDS = 4
NAMES = ("d0", "d1", "d2")


def p2pd_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "p2pd"], capture_output=True, text=True, timeout=10).stdout
    return {int(p) for p in out.split()}


def dht_peer(cluster: Cluster, timeout_s: float = 60.0) -> tuple[Proc, str]:
    proc = cluster.spawn("dht", ["dht", "--listen", "/ip4/127.0.0.1/tcp/0"])

    def maddr() -> str | None:
        assert proc.alive(), f"dht peer exited with {proc.popen.returncode}:\n{proc.log_text()[-3000:]}"
        for line in proc.stdout.read_text(errors="replace").splitlines():
            if line.startswith("lowband dht peer ") and "/127.0.0.1/" in line:
                return line.rsplit(" ", 1)[-1].strip()
        return None

    return proc, wait_for("the DHT peer's multiaddr", maddr, timeout_s)


def dht_node(cluster: Cluster, maddr: str, name: str, run: Path) -> Proc:
    workdir = cluster.root / name
    return cluster.spawn(name, ["node", "--dht", "--initial-peers", maddr, "--listen", "/ip4/127.0.0.1/tcp/0",
                                "--run", str(run), "--workdir", str(workdir), "--name", name, "--device", "cpu"],
                         workdir)


@pytest.mark.timeout(240)
def test_serverless_run_agrees_and_refuses_misfits(cluster: Cluster, tmp_path: Path) -> None:
    before = p2pd_pids()
    run = write_run_file(tmp_path / "run.toml", rounds=ROUNDS, H=2, min_nodes=3, run_id="it-dht")
    other = write_run_file(tmp_path / "other.toml", rounds=ROUNDS, H=3, min_nodes=3, run_id="it-dht")
    boot, maddr = dht_peer(cluster)
    nodes = [dht_node(cluster, maddr, name, run) for name in NAMES]
    assert wait_all_exit(nodes, timeout_s=150) == [0, 0, 0], cluster.dump_logs()

    fingerprints: dict[int, str] = {}
    for p in nodes:
        assert p.workdir is not None
        entries = check_round_sequence(read_log(p.workdir), p.name)
        assert [e["round"] for e in entries] == list(range(ROUNDS)), (p.name, entries)
        for e in entries:
            assert e["members"] == sorted(NAMES) and e["contributed"], (p.name, e)
            assert e["coordinator_fingerprint"] == ""  # no reference is published in serverless mode
            assert fingerprints.setdefault(e["round"], e["fingerprint"]) == e["fingerprint"], (p.name, e)

    # the run's config stays in the DHT (held by the bootstrap peer): a node with another H is refused by name
    odd = dht_node(cluster, maddr, "odd", other)
    assert odd.wait_exit(timeout_s=90) == 3
    text = odd.log_text()
    assert "join refused" in text and "recipe.H: 3 vs 2" in text, text[-3000:]
    # the same run file, but the run is past round 0: refused until serverless state transfer exists
    late = dht_node(cluster, maddr, "late", run)
    assert late.wait_exit(timeout_s=90) == 3
    assert "mid-way needs state transfer" in late.log_text(), late.log_text()[-3000:]
    for p in (odd, late):
        assert p.workdir is not None and not applied_rounds(p.workdir)

    cluster.stop_all()  # SIGTERM: the bootstrap peer shuts its DHT down
    assert boot.popen.returncode == 0, boot.log_text()[-3000:]
    deadline = time.monotonic() + 15
    while (left := p2pd_pids() - before) and time.monotonic() < deadline:
        time.sleep(0.1)  # polling a process table
    assert not left, f"p2pd processes left behind: {sorted(left)}"
