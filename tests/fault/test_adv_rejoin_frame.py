"""Adversarial checks of a node joining again with its frame kept (node/engine.py ``_rejoin``, ``_apply_observed``):
the round whose reply was lost must count as the node's own in every mode the run can be in."""
from __future__ import annotations

from pathlib import Path

from node.transport.faults import Fault, FaultSchedule
from daemon_harness import LocalCluster, run_config
from test_daemon_faults import NAMES, check_consistent


def test_with_overlapped_rounds_a_node_whose_reply_was_lost_still_counts_the_round_as_its_own(
        tmp_path: Path) -> None:
    """The same fault as test_daemon_faults' lost-reply test, with overlapped rounds (recipe.overlap): b's round-2
    frame is in round 2 and the run commits it, the reply is lost and b joins again. b must apply round 2 as a round
    it took part in (its error feedback learns the frame was sent; its local progress since is kept) and offer its
    round-3 frame at once, as without the fault — not log round 2 as only observed while its members name b (the
    soak's "not logged as contributed, but among the members"), which sends the residual a second time — so the run
    goes exactly as the same run without the fault."""
    fingerprints = {}
    for label, schedule in (("clean", FaultSchedule()), ("lost", FaultSchedule().fail_at("b", 2, Fault.LOST_REPLY))):
        with LocalCluster(tmp_path / label, run_config("sign", rounds=6, overlap=True), schedule,
                          min_nodes=3) as cl:
            cl.start_together(NAMES)
            assert all(o == {"code": 0} for o in cl.wait_all().values())
            assert not schedule.pending
            check_consistent(cl)
            b2 = cl.applied("b")[2]
            assert "b" in b2["members"], b2
            assert b2["contributed"], f"b's frame is in round 2 (members {b2['members']}) but b logged it as {b2}"
            fingerprints[label] = [cl.applied("a")[r]["fingerprint"] for r in range(6)]
    assert fingerprints["lost"] == fingerprints["clean"]
