"""Real-model failures through the real daemon (issue 15), on an in-process run: a NaN loss at one inner step of one
node in a run that needs all three nodes (min_nodes 3) — the run goes on, the node in every round; a node that
crashes resumes its data stream at the batch it would have used; a checkpoint from an older lowband (a pickle) is
ignored with a warning. Harness: daemon_harness.py; tasks: model_tasks.py."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from node.config import TaskConfig
from node.recipes import make_run_config
from node.transport.faults import Fault, FaultSchedule
from daemon_harness import TASK, LocalCluster
from test_daemon_faults import check_consistent

NAMES = ("a", "b", "c")
H = 2


def config(recipe: str, rounds: int, **task: int):  # type: ignore[no-untyped-def]
    return make_run_config(recipe, {"H": H, "inner.lr": 2e-3}, task=TaskConfig("model_tasks:model_test_gpt",
                                                                              {**TASK.params, **task}),
                           rounds=rounds, run_id=f"models-{recipe}")


@pytest.mark.parametrize("recipe", ["sign", "dct-consistent", "diloco"])
def test_a_nan_loss_on_one_node_of_a_three_node_quorum_never_stalls_the_run(
        tmp_path: Path, recipe: str, caplog: pytest.LogCaptureFixture) -> None:
    """Round 1's second inner step of the node on shard 1 has a NaN loss. Before, its residual and moments held NaN,
    every frame it sent after was refused, and a run needing three payloads waited for quorum forever."""
    with LocalCluster(tmp_path, config(recipe, rounds=4, poison_shard=1, poison_step=H + 1), min_nodes=3) as cl:
        cl.start_together(NAMES)
        assert all(o == {"code": 0} for o in cl.wait_all().values())
        check_consistent(cl)
        poisoned = next(n for n in NAMES if cl.nodes[n].daemon.worker.shard == 1)
        for name in NAMES:
            assert all(e["members"] == list(NAMES) for e in cl.applied(name).values()), name
        log = cl.applied(poisoned)
        assert log[1]["skipped_steps"] == 1 and all("skipped_steps" not in log[r] for r in (0, 2, 3))
        assert all(e["contributed"] and "reset" not in e for e in log.values())
        assert any(f"[node={poisoned} round=1] skipped 1 of {H} inner steps" in r.getMessage()
                   and "loss is nan" in r.getMessage() for r in caplog.records)


def test_a_crashed_node_resumes_its_stream_at_the_batch_it_would_have_used(tmp_path: Path) -> None:
    schedule = FaultSchedule().fail_at("b", 2, Fault.CRASH)
    with LocalCluster(tmp_path, config("sign", rounds=5), schedule, min_nodes=2) as cl:
        cl.start_together(NAMES)
        assert "crashed" in cl.nodes["b"].wait()
        first = cl.nodes["b"].daemon.worker
        assert first.inner.drawn == 3 * H  # rounds 0 and 1 applied and checkpointed, round 2 trained, then the crash
        cl.start("b")  # the same workdir
        assert all(o == {"code": 0} for o in cl.wait_all().values())
        check_consistent(cl)
        again = cl.nodes["b"].daemon.worker
        # a new stream, moved to where the checkpoint's rounds left off (whether or not the run moved on meanwhile and
        # it then took the run's state too: the stream is its own)
        assert again.task.starts == [0, 2 * H]
        trained = [r for r, e in cl.applied("b").items() if r >= 2 and not e.get("observed")]  # a round it missed
        assert again.shard == first.shard and again.inner.drawn == 2 * H + H * len(trained)  # while down is observed


def test_an_old_pickle_checkpoint_is_never_loaded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "checkpoint.pt").write_bytes(b"PK\x03\x04 an old torch.save archive")
    with caplog.at_level(logging.WARNING), LocalCluster(tmp_path, config("sign", rounds=2), min_nodes=2) as cl:
        cl.start_together(("a", "b"))
        assert all(o == {"code": 0} for o in cl.wait_all().values())
        check_consistent(cl, ("a", "b"))
    assert any("checkpoint.pt is a PyTorch pickle from an older lowband: it is never loaded" in r.getMessage()
               for r in caplog.records)
    assert (tmp_path / "a" / "checkpoint.safetensors").is_file()


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_batchnorm_statistics_are_one_agreed_value_on_every_replica_and_in_the_run(tmp_path: Path,
                                                                                   overlap: bool) -> None:
    """The example task (BatchNorm, a frozen stem) through real daemons: after every round each replica's reference
    buffers are the run's, including the running variance that used to stay each node's own."""
    cfg = make_run_config("diloco", {"H": 2, "inner.lr": 2e-3, "overlap": overlap},
                          task=TaskConfig("node.tasks.examples.shapes:shapes_task",
                                          {"batch_size": 4, "channels": 4, "size": 8}),
                          rounds=4, run_id="models-bn")
    with LocalCluster(tmp_path, cfg, min_nodes=3) as cl:
        cl.start_together(NAMES)
        assert all(o == {"code": 0} for o in cl.wait_all().values())
        check_consistent(cl)
        run_buffers = cl.run.reference.buffers
        assert run_buffers and any(b.is_floating_point() for b in run_buffers)
        for name in NAMES:
            mine = cl.nodes[name].daemon.worker.reference.buffers
            assert len(mine) == len(run_buffers)
            assert all(torch.equal(a, b) for a, b in zip(mine, run_buffers)), name
        variance = next(b for b, s in zip(run_buffers, cl.run.reference.buffer_spec) if "running_var" in s.name)
        assert not torch.equal(variance, torch.ones_like(variance))  # the statistics moved, and agree
