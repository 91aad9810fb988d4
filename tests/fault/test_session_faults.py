"""The Python API's sessions — a user's own training loop (session_harness.py) — on an in-process run through the
fault seam: replicas stay identical under dropped, late, corrupted and duplicated frames, with and without overlap;
user loops and ``lowband node`` daemons train one run together (one round engine under both); a node that crashes
comes back with its optimizer's moments, its param groups' lr and its scheduler exactly as checkpointed; a NaN loss
is a skipped step with ``grads_finite`` and a reset round without it, and the node stays in every round."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from node.transport.faults import Fault, FaultSchedule
from session_harness import SessionCluster, UserNode, checkpoint_tensors, warmup
from daemon_harness import run_config, wait_for
from test_daemon_faults import check_consistent, check_faults_fired

NAMES = ("a", "b", "c")


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_user_loops_under_random_faults_keep_identical_replicas(tmp_path: Path, overlap: bool) -> None:
    schedule = FaultSchedule(seed=7).random(NAMES, range(1, 7), rate=0.35)
    with SessionCluster(tmp_path, run_config("sign", rounds=8, overlap=overlap), schedule, min_nodes=2) as cl:
        cl.start_users_together(NAMES)
        outcomes = cl.wait_all()
        assert all(o == {"done": True} for o in outcomes.values()), outcomes
        check_faults_fired(cl, schedule, overlap)
        check_consistent(cl)
        for name in NAMES:
            node = cl.nodes[name]
            assert isinstance(node, UserNode) and node.joined["resumed"] is False
            applied = cl.applied(name)
            # what step() returned is what rounds.jsonl records, round by round
            committed = [r for r in node.reports if r.committed]
            assert committed and all(applied[r.round]["fingerprint"] == r.fingerprint for r in committed)
            assert all(r.members == tuple(applied[r.round]["members"]) for r in committed)
            # the user's scheduler was stepped by the user, once per inner step, and nothing else moved it
            assert node.scheduler.last_epoch == node.session.inner_step


def test_user_loops_and_daemons_train_one_run(tmp_path: Path) -> None:
    """The CLI's daemon and the API's session drive the same engine: a run mixing them ends with one replica."""
    with SessionCluster(tmp_path, run_config("diloco", rounds=5), min_nodes=3) as cl:
        cl.run.start_when(3)
        cl.start("a")
        cl.start_user("b")
        cl.start_user("c")
        outcomes = cl.wait_all()
        assert outcomes == {"a": {"code": 0}, "b": {"done": True}, "c": {"done": True}}, outcomes
        check_consistent(cl)
        assert all(e["members"] == list(NAMES) for n in NAMES for e in cl.applied(n).values())


def test_a_crashed_user_node_resumes_with_its_optimizer_and_scheduler_state(tmp_path: Path) -> None:
    """b dies in round 2 as under kill -9 (its checkpoint holds rounds 0 and 1) while the run holds round 2 open. Its
    new optimizer and scheduler objects get the moments, the param groups' lr and the LambdaLR's position that were
    written; it takes round 2 (which the others sent) from its result without contributing — no state download: its
    checkpoint is one round behind — which does not move its schedule, as for the task-driven node, and trains rounds 3
    and 4 from there."""
    H = 2
    schedule = FaultSchedule().fail_at("b", 2, Fault.CRASH)
    with SessionCluster(tmp_path, run_config("sign", rounds=5, H=H), schedule, min_nodes=2) as cl:
        cl.run.hold(2)
        cl.start_users_together(NAMES)
        assert "crashed" in cl.nodes["b"].wait()
        header = cl.checkpoint_header("b")
        saved = checkpoint_tensors(tmp_path / "b" / "checkpoint.safetensors")
        assert header["committed_rounds"] == 2 and header["inner"]["step"] == 2 * H
        assert header["inner"]["optimizer"] == "user:AdamW"
        assert header["inner"]["scheduler"]["last_epoch"] == 2 * H
        saved_lrs = [g["lr"] for g in header["inner"]["groups"]]
        assert saved_lrs == [pytest.approx(2e-3 * warmup(2 * H))] and warmup(2 * H) < 1  # in the warmup

        wait_for(lambda: cl.run.open.round == 2 and set(cl.run.open.frames) == {"a", "c"})
        restarted = cl.start_user("b")
        wait_for(lambda: "b" in cl.run.open.observers)  # it observes round 2 (still open) to catch up on it
        cl.run.release()
        assert all(o == {"done": True} for o in cl.wait_all().values())
        check_consistent(cl)
        joined = restarted.joined
        assert joined["resumed"] and joined["inner_step"] == 2 * H and joined["last_epoch"] == 2 * H
        assert joined["optimizer"]["lrs"] == saved_lrs
        assert [e.get("why") for e in cl.log("b") if e.get("event") == "state"] == []  # caught up, no download
        assert cl.applied("b")[2]["observed"] and not cl.applied("b")[2]["contributed"]
        state = joined["optimizer"]["state"]
        names = [n for n, _ in restarted.model.named_parameters()]
        assert {(names[i], k) for i, k in state} == {tuple(key[len("inner/"):].rsplit("/", 1)) for key in saved
                                                      if key.startswith("inner/")}
        for (i, key), value in state.items():
            assert torch.equal(value, saved[f"inner/{names[i]}/{key}"]), (names[i], key)
        assert restarted.scheduler.last_epoch == restarted.session.inner_step == 4 * H
        assert [r.round for r in restarted.reports] == [3, 4] and all(r.contributed for r in restarted.reports)


@pytest.mark.parametrize("grads_check", [True, False], ids=["grads_finite", "unchecked"])
def test_a_nan_loss_in_a_user_loop_never_takes_the_node_out_of_the_run(tmp_path: Path, grads_check: bool) -> None:
    """With ``grads_finite`` the poisoned step is skipped (counted in the round's record); without it the NaN reaches
    the parameters and the moments, and the node resets from θ_ref at the round's end (Δ = 0, fresh moments) — it
    sends a valid frame either way, so a run that needs all three payloads goes on."""
    with SessionCluster(tmp_path, run_config("sign", rounds=4), min_nodes=3) as cl:
        cl.run.start_when(3)
        cl.start_user("a")
        cl.start_user("b", grads_check=grads_check, nan_at=3)  # round 1's second step (H = 2)
        cl.start_user("c")
        assert all(o == {"done": True} for o in cl.wait_all().values())
        check_consistent(cl)
        for name in NAMES:
            assert all(e["members"] == list(NAMES) and e["contributed"] for e in cl.applied(name).values())
        b = cl.applied("b")
        if grads_check:
            assert b[1]["skipped_steps"] == 1 and "reset" not in b[1]
            assert [r.skipped_steps for r in cl.nodes["b"].reports] == [0, 1, 0, 0]
        else:
            assert "skipped_steps" not in b[1] and "not finite" not in b[1]["reset"]
            assert b[1]["reset"].startswith(("pseudo-gradient", "inner state"))
        assert all(torch.isfinite(p).all() for p in cl.nodes["b"].model.parameters())
