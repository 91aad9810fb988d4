"""The Python API's examples as a user runs them (issue 19): a coordinator and two processes on 127.0.0.1 training a
transformers GPT-2 built from a small config — one with the user's own loop (examples/hf_gpt2.py), one with a
``transformers.Trainer`` and the one added line (examples/hf_trainer.py) — and a node of the first killed with
SIGKILL and started again, which comes back with its optimizer's moments and its LR schedule. Every node's replica
is the coordinator's, round by round."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from lowband_cluster import (Cluster, Proc, applied_rounds, check_replicas, read_log, rounds_table, terminate,
                             wait_all_exit, wait_for)
from node.runfile import build_run_file

if os.environ.get("CI"):
    import transformers  # noqa: F401  (CI installs the hf extra: a missing one must fail, not skip)
else:
    pytest.importorskip("transformers", reason="needs the hf extra: LOWBAND_EXTRAS=test,hf bash deploy/setup.sh")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TASK = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "batch_size": 8, "eval_batches": 1}  # examples'
LR, WARMUP = 1e-3, 16  # examples/hf_gpt2.py's defaults


def write_run(path: Path, rounds: int, H: int = 2, lease_s: float = 5.0) -> Path:
    path.write_text(build_run_file(
        run_id="it-hf", recipe="sign", rounds=rounds, task="node.tasks.hf:causal_lm", task_params=TASK,
        recipe_overrides={"H": H, "inner.lr": LR},
        membership={"min_nodes": 2, "max_nodes": 16, "heartbeat_s": 0.5, "lease_s": lease_s},
        rounds_policy={"initial_wait_s": 60.0, "min_wait_s": 1.0, "max_wait_s": 60.0, "eval_every": 0}))
    return path


def example(cluster: Cluster, script: str, name: str, address: str, run: Path, *extra: str) -> Proc:
    workdir = cluster.root / name
    return cluster.spawn(name, ["--coordinator", address, "--run", str(run), "--workdir", str(workdir),
                                "--name", name, *extra], workdir, program=[str(EXAMPLES / script)])


def printed(proc: Proc) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stdout.read_text().splitlines() if line.startswith("{\"event\"")]


@pytest.mark.timeout(300)
def test_the_user_loop_example_trains_a_gpt2_through_a_coordinator(cluster: Cluster, tmp_path: Path) -> None:
    run = write_run(tmp_path / "run.toml", rounds=4)
    coord = cluster.coordinator(run, tmp_path / "state")
    nodes = [example(cluster, "hf_gpt2.py", name, coord.address, run) for name in ("u0", "u1")]
    assert wait_all_exit(nodes, timeout_s=240) == [0, 0]
    assert terminate(coord) == [0]
    fingerprints = check_replicas({p.name: p.workdir for p in nodes}, rounds_table(tmp_path / "state"))
    assert len(fingerprints) == 4
    for proc in nodes:
        lines = printed(proc)
        assert lines[0]["event"] == "joined" and lines[0]["resumed"] is False
        rounds = [e for e in lines if e["event"] == "round"]
        # what session.step() returned is the run's round: its number, members and replica fingerprint
        assert [(e["round"], e["fingerprint"], e["members"]) for e in rounds] == \
            [(r, fingerprints[r], ["u0", "u1"]) for r in range(4)]
        assert all(e["status"] == "committed" and e["contributed"] and e["bytes_out"] > 0 for e in rounds)
        assert rounds[-1]["loss"] < rounds[0]["loss"]
        assert "[node=" + proc.name + " round=3]" in proc.log_text()


@pytest.mark.timeout(300)
def test_a_trainer_script_joins_a_run_with_one_added_line(cluster: Cluster, tmp_path: Path) -> None:
    run = write_run(tmp_path / "run.toml", rounds=3)
    coord = cluster.coordinator(run, tmp_path / "state")
    nodes = [example(cluster, "hf_trainer.py", name, coord.address, run, "--data-seed", str(i))
             for i, name in enumerate(("t0", "t1"))]
    assert wait_all_exit(nodes, timeout_s=240) == [0, 0]
    assert terminate(coord) == [0]
    fingerprints = check_replicas({p.name: p.workdir for p in nodes}, rounds_table(tmp_path / "state"))
    assert len(fingerprints) == 3
    for proc in nodes:
        assert all(e["contributed"] and e["members"] == ["t0", "t1"] for e in applied_rounds(proc.workdir))
        # the run ended the Trainer (its own bound is 100000 steps): 3 rounds of H = 2 optimizer steps
        assert "'train_runtime'" in proc.stdout.read_text() and "'epoch'" in proc.stdout.read_text()
        header = __import__("node.train.state_file", fromlist=["parse"]).parse(
            (proc.workdir / "checkpoint.safetensors").read_bytes()).header
        assert header["inner"]["step"] == 6 and header["inner"]["optimizer"] == "user:AdamW"
        assert header["inner"]["scheduler"]["last_epoch"] == 6  # the Trainer's own scheduler, checkpointed


def checkpoint_optimizer_digest(workdir: Path) -> tuple[dict[str, Any], str]:
    """The checkpoint's header and examples/hf_common.py's optimizer digest of the state it holds."""
    import hashlib

    from safetensors import safe_open

    from node.train import state_file

    path = workdir / "checkpoint.safetensors"
    header = state_file.parse(path.read_bytes()).header
    h = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        for key in sorted(k for k in f.keys() if k.startswith("inner/")):
            value = f.get_tensor(key).float().contiguous()
            h.update(key[len("inner/"):].encode() + b"\0" + value.reshape(-1).numpy().tobytes())
    return header, h.hexdigest()[:16]


@pytest.mark.timeout(420)
def test_a_killed_user_loop_node_resumes_with_its_optimizer_and_schedule(cluster: Cluster, tmp_path: Path) -> None:
    run = write_run(tmp_path / "run.toml", rounds=10, lease_s=60.0)  # the run waits for the killed node's return
    coord = cluster.coordinator(run, tmp_path / "state")
    u0 = example(cluster, "hf_gpt2.py", "u0", coord.address, run)
    u1 = example(cluster, "hf_gpt2.py", "u1", coord.address, run)
    wait_for("u1 to apply three rounds", lambda: len(applied_rounds(u1.workdir)) >= 3 or None, timeout_s=200)
    u1.kill9()
    header, digest = checkpoint_optimizer_digest(u1.workdir)
    saved_step = header["inner"]["step"]
    # written on a thread after each applied round: at least the one before the last logged (round 1: 2 rounds × H)
    assert saved_step >= 4 and saved_step == 2 * header["committed_rounds"]
    assert header["inner"]["scheduler"]["last_epoch"] == saved_step
    again = example(cluster, "hf_gpt2.py", "u1", coord.address, run)
    joined = wait_for("u1 to join again", lambda: next(iter(printed(again)), None), timeout_s=120)
    assert joined["resumed"] is True
    assert joined["optimizer"] == digest  # the moments it had written, in a new optimizer object
    # the schedule went on from the checkpoint: equal to the checkpoint's, or moved to the run's if the run's state was
    # newer (never restarted from 0, whose warmup lr would be LR / WARMUP)
    assert joined["inner_step"] >= saved_step and joined["scheduler_last_epoch"] == joined["inner_step"]
    assert joined["lr"] == pytest.approx(LR * min(1.0, (joined["scheduler_last_epoch"] + 1) / WARMUP))
    assert wait_all_exit([u0, again], timeout_s=240) == [0, 0]
    assert terminate(coord) == [0]
    check_replicas({"u0": u0.workdir, "u1": u1.workdir}, rounds_table(tmp_path / "state"), killed={"u1"})
    assert read_log(u1.workdir)[-1]["round"] == 9 and read_log(u1.workdir)[-1]["contributed"]
