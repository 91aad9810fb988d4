"""A multi-process node (issue 17, item 4): ``lowband node --nproc 2`` runs the node under torchrun as two local
processes (gloo on CPU) training one data-parallel replica, in a real run with a coordinator and a plain node. Rank 0
alone talks to the run: one member, one frame a round, one round log; at each round boundary it hands its local
state to rank 1, so both end on the same model, and that replica is everyone's."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from lowband_cluster import (Cluster, applied_rounds, check_replicas, read_log, rounds_table, terminate, wait_all_exit,
                             write_run_file)


@pytest.mark.timeout(300)
def test_two_local_processes_train_one_replica_in_a_coordinator_run(cluster: Cluster, tmp_path: Path) -> None:
    run = write_run_file(tmp_path / "run.toml", rounds=4, min_nodes=2, H=2, max_wait_s=30.0)
    coord = cluster.coordinator(run, tmp_path / "state")
    multi = cluster.spawn("multi", ["-v", "node", "--coordinator", coord.address, "--workdir", str(tmp_path / "multi"),
                                    "--name", "multi", "--device", "cpu", "--run", str(run), "--nproc", "2"],
                          tmp_path / "multi")
    plain = cluster.node(coord.address, "plain")
    assert wait_all_exit([multi, plain], timeout_s=240) == [0, 0], cluster.dump_logs()
    assert terminate(coord) == [0]
    fingerprints = check_replicas({"multi": multi.workdir, "plain": plain.workdir}, rounds_table(tmp_path / "state"))
    assert len(fingerprints) == 4
    log = read_log(multi.workdir)
    assert len(log) == 4 and all(e["contributed"] and e["members"] == ["multi", "plain"] for e in log)
    # the node's frame, once: as many bytes out per round as the single-process node's
    assert [e["bytes_out"] for e in applied_rounds(multi.workdir)] == [e["bytes_out"] for e in
                                                                       applied_rounds(plain.workdir)]
    text = multi.log_text()
    assert "local rank 0 of 2 on cpu (gloo): this process talks to the run" in text
    assert "local rank 1 of 2 on cpu (gloo)" in text
    assert text.count("joined 127.0.0.1") == 1  # rank 1 never joined
    # both processes trained every round, in lockstep: after each round's steps their local models are equal
    trained: dict[str, dict[str, str]] = {}
    for rank, round_, fp in re.findall(r"local rank (\d): round (\d+) trained, local state ([0-9a-f]{16})", text):
        trained.setdefault(round_, {})[rank] = fp
    assert sorted(trained) == ["0", "1", "2", "3"], text[-3000:]
    assert all(set(fps) == {"0", "1"} and len(set(fps.values())) == 1 for fps in trained.values()), trained
    assert len({fps["0"] for fps in trained.values()}) == 4  # and the model moved every round
    finals = dict(re.findall(r"local rank (\d): final local state ([0-9a-f]{16})", text))
    assert set(finals) == {"0", "1"} and finals["0"] == finals["1"], text[-3000:]


@pytest.mark.timeout(300)
def test_a_users_ddp_loop_under_torchrun_is_one_node_through_the_api(cluster: Cluster, tmp_path: Path) -> None:
    """Two ranks of a user's DDP loop call ``lowband.join`` and ``session.step()``: one member of the run; every rank
    gets every round's report and, after it, the same local model."""
    import json

    run = write_run_file(tmp_path / "run.toml", rounds=3, min_nodes=2, H=2, max_wait_s=30.0)
    coord = cluster.coordinator(run, tmp_path / "state")
    script = Path(__file__).with_name("api_ddp_loop.py")
    ddp = cluster.spawn("ddp", ["--coordinator", coord.address, "--run", str(run), "--workdir", str(tmp_path / "ddp"),
                                "--name", "ddp"], tmp_path / "ddp",
                        program=["-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2",
                                 "--", str(script)])
    plain = cluster.node(coord.address, "plain")
    assert wait_all_exit([ddp], timeout_s=240) == [0]
    assert wait_all_exit([plain], timeout_s=60) == [0]
    assert terminate(coord) == [0]
    fingerprints = check_replicas({"ddp": ddp.workdir, "plain": plain.workdir}, rounds_table(tmp_path / "state"))
    lines = [json.loads(line) for rank in (0, 1) for line in (ddp.workdir / f"rank{rank}.jsonl").read_text().splitlines()]
    by_round: dict[int, dict[int, dict[str, object]]] = {}
    for line in lines:
        by_round.setdefault(int(line["round"]), {})[int(line["rank"])] = line
    assert sorted(by_round) == [0, 1, 2], lines
    for r, ranks in by_round.items():
        assert set(ranks) == {0, 1}
        assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"] == fingerprints[r]
        assert ranks[0]["local"] == ranks[1]["local"]
        assert ranks[0]["members"] == ["ddp", "plain"]
