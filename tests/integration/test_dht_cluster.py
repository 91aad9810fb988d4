"""Serverless mode end to end: a ``lowband dht`` bootstrap peer and three ``lowband node --dht`` processes on
127.0.0.1 (NAT traversal off), each with its authority's grant, train a tiny run to the end with identical replicas
(``sign`` and ``dct-consistent``); a node whose run file was edited after its authority signed it is refused
naming the field."""
from __future__ import annotations

from pathlib import Path

import pytest

from dht_runs import edited, grant, signed_run
from lowband_cluster import Cluster, applied_rounds, check_replicas, dht_node, dht_peer, wait_all_exit, wait_for

ROUNDS = 6
NAMES = ("d0", "d1", "d2")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("recipe", ["sign", "dct-consistent"])
def test_serverless_run_agrees_and_refuses_misfits(cluster: Cluster, tmp_path: Path, recipe: str) -> None:
    run = signed_run(tmp_path / "run.toml", recipe=recipe, rounds=ROUNDS, H=2, min_nodes=3, run_id="it-dht")
    other = edited(run, tmp_path / "other.toml", recipe=recipe, rounds=ROUNDS, H=3, min_nodes=3, run_id="it-dht")
    for name in (*NAMES, "odd"):
        grant(cluster, run, name)
    boot, maddr = dht_peer(cluster)
    nodes = [dht_node(cluster, maddr, name, run) for name in NAMES]
    assert wait_all_exit(nodes, timeout_s=150) == [0, 0, 0], cluster.dump_logs()

    # rounds in sequence, and every round's fingerprint and members the same on every node
    fingerprints = check_replicas({p.name: p.workdir for p in nodes}, None)
    assert sorted(fingerprints) == list(range(ROUNDS)), fingerprints
    for p in nodes:
        assert p.workdir is not None
        entries = applied_rounds(p.workdir)
        assert [e["round"] for e in entries] == list(range(ROUNDS)), (p.name, entries)
        for e in entries:
            assert e["members"] == sorted(NAMES) and e["contributed"], (p.name, e)
            assert e["coordinator_fingerprint"] == ""  # no reference is published in serverless mode

    # the run's signed config stays in the DHT (held by the bootstrap peer): a node whose run file says another H
    # (its signature no longer matches) is refused, naming the field
    odd = dht_node(cluster, maddr, "odd", other)
    assert odd.wait_exit(timeout_s=90) == 3
    text = odd.log_text()
    assert "join refused" in text and "recipe.H: 3 vs 2" in text, text[-3000:]
    assert odd.workdir is not None and not applied_rounds(odd.workdir)

    cluster.stop_all()  # SIGTERM: the bootstrap peer shuts its DHT down
    assert boot.popen.returncode == 0, boot.log_text()[-3000:]
    try:  # a p2pd exits shortly after its DHT process (it notices the closed control socket)
        wait_for("every p2pd of this test to exit", lambda: not cluster.p2pd_pids(), timeout_s=15)
    except AssertionError:
        raise AssertionError(f"p2pd processes left behind: {sorted(cluster.p2pd_pids())}") from None
