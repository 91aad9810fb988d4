"""The real node daemon, several at once in one process, on an in-process run with faults injected through the
control-plane seam (``FaultyPlane``): what a node does when its frame is dropped, late, corrupted or delivered twice,
when a payload it receives is corrupted, when it crashes and restarts from its workdir, when the run forgets it and
when the run loses the frames it held. Every test checks the audit trail (each round applied once, in order) and
that every replica ends bit-identical to the run's reference."""
from __future__ import annotations

from pathlib import Path

import pytest

from node.clock import ManualClock
from node.daemon import STEP_IN_MAX_S
from node.transport.faults import Fault, FaultSchedule
from daemon_harness import LocalCluster, run_config, wait_for

NAMES = ("a", "b", "c")


def check_consistent(cl: LocalCluster, names: tuple[str, ...] = NAMES) -> None:
    """Every node ended the run at the run's reference, and its trail holds every round exactly once."""
    run_fp = cl.run.reference.fingerprint()
    for name in names:
        applied = cl.applied(name)
        last_state = max((e["committed_rounds"] for e in cl.log(name) if e.get("event") == "state"), default=0)
        assert set(range(last_state, cl.cfg.rounds)) <= set(applied), (name, sorted(applied), last_state)
        assert cl.final_fingerprint(name) == run_fp, name
    by_round: dict[int, set[str]] = {}
    for name in names:
        for r, e in cl.applied(name).items():
            by_round.setdefault(r, set()).add(e["fingerprint"])
    assert all(len(fps) == 1 for fps in by_round.values()), by_round


def check_faults_fired(cl: LocalCluster, schedule: FaultSchedule, overlap: bool) -> None:
    """Every fault of ``schedule`` fired, except at a round its node offered no frame for: a node whose frame missed
    two rounds in a row sits the next round out (it observes it: ``RoundEngine._finish``; never with overlap). Whether
    one does depends on which frames reach a round that lost every frame first, once it is offered again (seed 7: c
    misses round 2 by a DELAY; round 3, all frames lost, closes with the first two frames offered again)."""
    assert schedule.fired
    for hit in schedule.pending:
        entry = cl.applied(hit.node).get(hit.round)
        assert not overlap and entry is not None and entry.get("observed") and not entry["contributed"], (hit, entry)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_random_faults_never_split_the_replicas(tmp_path: Path, overlap: bool) -> None:
    schedule = FaultSchedule(seed=7).random(NAMES, range(1, 7), rate=0.35)
    with LocalCluster(tmp_path, run_config("sign", rounds=8, overlap=overlap), schedule, min_nodes=2) as cl:
        cl.start_together(NAMES)
        outcomes = cl.wait_all()
        assert all(o == {"code": 0} for o in outcomes.values()), outcomes
        check_faults_fired(cl, schedule, overlap)
        check_consistent(cl)
        lost = {(h.node, h.round) for h in schedule.fired if h.fault in (Fault.DROP, Fault.DELAY)}
        for hit in schedule.fired:  # a frame lost, late or corrupted on the way is not in its round ...
            entry = cl.applied(hit.node).get(hit.round)
            if entry is None or hit.fault is Fault.DUPLICATE:
                continue
            if all((n, hit.round) in lost for n in NAMES):
                continue  # ... unless every frame of the round was lost: it timed out and was offered again
            assert not entry["contributed"] and hit.node not in entry["members"], (hit, entry)
        for name in NAMES:  # and a duplicate changes nothing: the round holds the frame once
            for e in cl.applied(name).values():
                assert len(e["members"]) == len(set(e["members"]))


def test_a_payload_corrupted_on_the_way_down_is_caught_by_the_fingerprint_and_the_state_adopted(
        tmp_path: Path) -> None:
    schedule = FaultSchedule(seed=1).fail_at("b", 2, Fault.CORRUPT_RESULT)
    with LocalCluster(tmp_path, run_config("sign", rounds=5), schedule, min_nodes=2) as cl:
        cl.start_together(NAMES)
        assert all(o == {"code": 0} for o in cl.wait_all().values())
        adopted = [e for e in cl.log("b") if e.get("event") == "state"]
        assert [(e["why"], e["committed_rounds"]) for e in adopted] == [("fingerprint mismatch", 3)]
        # b rejected the corrupted payload, so its round-2 replica was not the run's, and it says so
        b2 = cl.applied("b")[2]
        assert b2["fingerprint"] != b2["coordinator_fingerprint"] == cl.applied("a")[2]["fingerprint"]
        assert all(e["fingerprint"] == e["coordinator_fingerprint"] for r, e in cl.applied("b").items() if r != 2)


def test_a_state_older_than_the_nodes_round_is_replayed_up_to_it_the_node_never_goes_back(tmp_path: Path) -> None:
    """b's replica diverges at round 3 (a payload corrupted on the way down) and the state it then fetches is the one
    after its first round, older than its own (a coordinator whose newest snapshot is a few rounds old serves that):
    b applies rounds 1-3 again from their results without logging them, and its trail says it adopted the state after
    4 rounds — never a state older than what it applied — and ends on the run's reference."""
    schedule = (FaultSchedule(seed=1).fail_at("b", 3, Fault.CORRUPT_RESULT).fail_at("b", 3, Fault.STALE_STATE))
    with LocalCluster(tmp_path, run_config("sign", rounds=6), schedule, min_nodes=2) as cl:
        cl.start_together(NAMES)
        assert all(o == {"code": 0} for o in cl.wait_all().values())
        assert not schedule.pending
        adopted = [e for e in cl.log("b") if e.get("event") == "state"]
        assert [(e["why"], e["committed_rounds"]) for e in adopted] == [("fingerprint mismatch", 4)]
        assert adopted[0]["fingerprint"] == cl.applied("a")[3]["fingerprint"]
        assert cl.final_fingerprint("b") == cl.run.reference.fingerprint()
        assert all(e["fingerprint"] == cl.applied("a")[r]["fingerprint"] for r, e in cl.applied("b").items() if r != 3)
        rounds = [e["round"] for e in cl.log("b") if "round" in e]
        assert rounds == sorted(set(rounds)) == list(range(6))  # each round once, in order: nothing applied twice


def test_a_node_that_crashes_restarts_from_its_workdir_and_catches_up(tmp_path: Path) -> None:
    schedule = FaultSchedule().fail_at("b", 2, Fault.CRASH)
    with LocalCluster(tmp_path, run_config("sign", rounds=6), schedule, min_nodes=2) as cl:
        cl.run.hold(4)  # a and c go on without b up to round 4, and wait there: b comes back two rounds behind
        cl.start_together(NAMES)
        crashed = cl.nodes["b"].wait()
        assert "crashed" in crashed, crashed
        checkpointed = {e["round"] for e in cl.log("b") if "round" in e}
        assert checkpointed == {0, 1}  # it died in round 2, as under kill -9: no Leave, no exit checkpoint
        wait_for(lambda: cl.run.reference.committed_rounds == 4)
        cl.start("b")  # the same workdir
        wait_for(lambda: 3 in cl.applied("b"))
        cl.run.release()
        assert all(o == {"code": 0} for o in cl.wait_all().values())
        check_consistent(cl)
        assert cl.applied("b")[5]["contributed"]  # back in the run
        log = cl.log("b")
        resumed = [i for i, e in enumerate(log) if e.get("event") == "resumed"]
        # the restart says where its checkpoint left the node (after rounds 0 and 1), right after the rounds before it
        assert len(resumed) == 1 and log[resumed[0]]["committed_rounds"] == 2, log
        assert [e["round"] for e in log[:resumed[0]]] == [0, 1]
        # two rounds behind: it applies them from their results, no state download
        assert not [e for e in log if e.get("event") == "state"], log
        assert cl.applied("b")[2]["observed"]


def test_a_node_late_two_rounds_in_a_row_sits_one_out_to_get_back_in_step(tmp_path: Path) -> None:
    schedule = FaultSchedule().fail_at("b", 1, Fault.DELAY).fail_at("b", 2, Fault.DELAY)
    with LocalCluster(tmp_path, run_config("sign", rounds=6), schedule, min_nodes=2) as cl:
        cl.start_together(NAMES)
        assert all(o == {"code": 0} for o in cl.wait_all().values())
        check_consistent(cl)
        b = cl.applied("b")
        assert [b[r]["contributed"] for r in (0, 1, 2)] == [True, False, False]
        assert b[3].get("observed") is True and not b[3]["contributed"]  # the round it sat out
        assert b[4]["contributed"] and b[5]["contributed"]


def test_a_node_the_run_forgot_joins_again_and_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Depending on when it comes back, it resumes from its checkpoint (the round it missed is still open) or takes
    the run's state; either way it applies every round once and contributes again."""
    schedule = FaultSchedule().fail_at("c", 3, Fault.FORGET)
    with LocalCluster(tmp_path, run_config("sign", rounds=6), schedule, min_nodes=2) as cl:
        cl.start_together(NAMES)
        assert all(o == {"code": 0} for o in cl.wait_all().values())
        check_consistent(cl)
        assert any("[node=c] the run forgot c at round 3 (injected): joining again" in r.getMessage()
                   for r in caplog.records)
        assert cl.applied("c")[5]["contributed"]


def test_a_node_whose_frame_made_the_round_but_whose_reply_was_lost_counts_the_round_as_its_own(
        tmp_path: Path) -> None:
    """b's round-2 frame is in the round, the reply is lost and the run forgets b meanwhile: b joins again, learns
    the round's result and applies it as a round it took part in (its error feedback takes what was sent), never as
    one it only observed — so the run goes exactly as the same run without the fault, round by round."""
    fingerprints = {}
    for label, schedule in (("clean", FaultSchedule()), ("lost", FaultSchedule().fail_at("b", 2, Fault.LOST_REPLY))):
        with LocalCluster(tmp_path / label, run_config("sign", rounds=6), schedule, min_nodes=3) as cl:
            cl.start_together(NAMES)
            assert all(o == {"code": 0} for o in cl.wait_all().values())
            assert not schedule.pending
            check_consistent(cl)
            b2 = cl.applied("b")[2]
            assert b2["contributed"] and "b" in b2["members"], b2
            rounds = [e["round"] for e in cl.log("b") if "round" in e]
            assert rounds == list(range(6)), rounds  # each round once, in order
            fingerprints[label] = [cl.applied("a")[r]["fingerprint"] for r in range(6)]
    assert fingerprints["lost"] == fingerprints["clean"]


def test_frames_a_restarted_run_lost_are_offered_again(tmp_path: Path) -> None:
    """The coordinator restarts while a round is open: it no longer holds the frames it had; the nodes waiting for
    the round submit theirs again, and the round commits once, with every member."""
    with LocalCluster(tmp_path, run_config("sign", rounds=5), min_nodes=3) as cl:
        restarted = False

        def restart_once(round_: int, frames: int) -> None:
            nonlocal restarted
            if round_ == 2 and frames == 2 and not restarted:  # two of three frames in: lose them
                restarted = True
                cl.run.restart()

        cl.run.on_frame = restart_once
        cl.start_together(NAMES)
        assert all(o == {"code": 0} for o in cl.wait_all().values())
        assert restarted
        check_consistent(cl)
        assert all(cl.applied(n)[2]["contributed"] and len(cl.applied(n)[2]["members"]) == 3 for n in NAMES)


def test_a_joiner_with_overlapped_rounds_steps_in_at_a_round_boundary(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, run_config("sign", rounds=16, overlap=True), min_nodes=2) as cl:
        cl.run.hold(3)  # a and b get as far as round 3, and wait there for the joiner to arrive
        for name in NAMES[:2]:
            cl.start(name)
        wait_for(lambda: cl.run.open.round == 3 and len(cl.run.open.frames) == 2)
        cl.start("c")
        wait_for(lambda: "c" in cl.run.members)
        cl.run.release()
        assert all(o == {"code": 0} for o in cl.wait_all().values())
        check_consistent(cl)
        c = cl.log("c")
        assert c[0]["event"] == "state" and c[0]["why"] == "join"
        stepped = [e for e in c if e.get("overlapped")]
        assert len(stepped) == 1 and not stepped[0]["contributed"]  # the round observed while it trained the next
        first = min(r for r, e in cl.applied("c").items() if e["contributed"])
        assert first == stepped[0]["round"] + 1


def test_a_joiner_whose_peers_never_start_a_round_stops_waiting_for_them(tmp_path: Path) -> None:
    """Stepping in waits for the others' next round to start, at most STEP_IN_MAX_S — on the daemon's clock, so this
    test waits that long in virtual time only."""
    with LocalCluster(tmp_path, run_config("sign", rounds=3, overlap=True)) as cl:
        cl.start("a", max_rounds=1)  # one round, then it leaves: nobody will start round 1
        assert cl.nodes["a"].wait() == {"code": 0}
        clock = ManualClock()
        cl.start("j", clock=clock)
        assert cl.nodes["j"].wait() == {"code": 0}
        assert clock.slept >= STEP_IN_MAX_S
        j = cl.applied("j")
        assert sorted(j) == [1, 2] and all(e["contributed"] for e in j.values())
