"""Serverless churn with real processes on 127.0.0.1: a node joins mid-run and downloads the state from the two
running peers, a node is killed (-9) in the middle of the run and the others commit without it, the bootstrap
peer dies and the run goes on, and a new node joins through a surviving node's address instead."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from dht_runs import signed_run
from lowband_cluster import Cluster, Proc, applied_rounds, check_replicas, dht_node, dht_peer, node_maddr, read_log, \
    terminate, wait_for

CHUNK = "65536"  # the tiny model's state is ~2 MB: 32 chunks to spread over the donors


def rounds_after(proc: Proc, t: float) -> list[dict]:
    assert proc.workdir is not None
    return [e for e in applied_rounds(proc.workdir) if e["time"] > t]


def wait_rounds(proc: Proc, n: int, after: float = 0.0, timeout_s: float = 90.0, members: list[str] | None = None
                ) -> list[dict]:
    def probe() -> list[dict] | None:
        assert proc.alive(), f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_text()[-3000:]}"
        got = [e for e in rounds_after(proc, after) if members is None or e["members"] == members]
        return got if len(got) >= n else None

    return wait_for(f"{n} rounds applied by {proc.name}" + (f" with members {members}" if members else ""), probe,
                    timeout_s)


def first_join(proc: Proc) -> tuple[dict, dict]:
    """(the state event, the first applied round after it) from a joiner's round log."""
    assert proc.workdir is not None
    entries = read_log(proc.workdir)
    state = next(e for e in entries if e.get("event") == "state")
    first = next(e for e in entries if "round" in e)
    return state, first


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serverless_joins_from_donors_and_survives_a_crash_and_the_bootstrap_peer_dying(
        cluster: Cluster, tmp_path: Path) -> None:
    run = signed_run(tmp_path / "run.toml", open_run=True, rounds=10_000, H=2, min_nodes=2, run_id="it-dht-churn",
                     min_wait_s=1.0, max_wait_s=10.0, initial_wait_s=10.0)  # open: any node with the run file joins
    boot, maddr = dht_peer(cluster)
    d0, d1 = (dht_node(cluster, maddr, n, run) for n in ("d0", "d1"))
    wait_rounds(d0, 3)

    # 1. a node joins at round ≥ 3: the state comes in chunks from both running peers
    j = dht_node(cluster, maddr, "j", run, "--state-chunk-bytes", CHUNK)
    wait_rounds(j, 2)
    state, first = first_join(j)
    assert state["committed_rounds"] >= 3 and state["why"] == "join"
    assert first["round"] == state["committed_rounds"], (state, first)
    assert first["contributed"] and first["members"] == ["d0", "d1", "j"], first  # from its first round on
    donors = re.search(r"from (\d+) donors \((.*)\)", j.log_text())
    assert donors and donors.group(1) == "2", j.log_text()[-3000:]
    assert all(int(n) > 0 for n in re.findall(r": (\d+) B", donors.group(2))), donors.group(0)

    # 2. kill -9 a node in the middle of the run: the others commit without it and go on
    d1.kill9()
    killed = time.time()
    wait_rounds(d0, 2, after=killed, members=["d0", "j"])
    wait_rounds(j, 2, after=killed, members=["d0", "j"])

    # 3. the bootstrap peer dies: the nodes know each other and keep training
    boot.kill9()
    gone = time.time()
    wait_rounds(d0, 2, after=gone, members=["d0", "j"])
    # ... and a new node joins through a surviving node's address
    k = dht_node(cluster, node_maddr(j), "k", run)
    wait_rounds(k, 1)
    _, k_first = first_join(k)
    assert k_first["contributed"] and k_first["members"] == ["d0", "j", "k"], k_first

    assert terminate(d0, j, k, timeout_s=60) == [0, 0, 0], cluster.dump_logs()
    fingerprints = check_replicas({p.name: p.workdir for p in (d0, d1, j, k)}, None)
    for p, state_fp in ((j, first_join(j)[0]), (k, first_join(k)[0])):  # the downloaded state was the run's
        before = state_fp["committed_rounds"] - 1
        assert fingerprints[before] == state_fp["fingerprint"], (p.name, state_fp)
