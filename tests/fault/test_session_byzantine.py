"""A hostile member among user loops (the Python API's sessions) on an in-process run: the same attack as
test_daemon_byzantine.py — well-formed frames, signed with the key the node joined with, 1e25 × its honest update.
The sessions sign and verify frames and run the robust reduce as the daemon does: every honest replica drops the
frames alike and evicts the member, each round's accountability report reaches ``step()``'s report
(``RoundReport.robust``) and rounds.jsonl, and the evicted session's next ``step()`` raises ``JoinRefused`` — after
which the session is done and ``close()`` leaves as the daemon does (exit checkpoint, Leave)."""
from __future__ import annotations

import math
from pathlib import Path

from node.identity import NodeKey
from node.recipes import get_recipe
from node.robust.defaults import untrusted_overrides
from daemon_harness import run_config
from session_harness import SessionCluster, UserNode
from test_daemon_byzantine import HugeScalePlane
from test_daemon_faults import check_consistent

HONEST = ("a", "b", "c")


def test_a_hostile_user_loop_is_bounded_evicted_and_refused_and_every_session_reports_it(tmp_path: Path) -> None:
    cfg = run_config("sign", rounds=8, **untrusted_overrides(get_recipe("sign")))
    with SessionCluster(tmp_path, cfg, min_nodes=3) as cl:
        cl.run.start_when(4)
        for name in HONEST:
            cl.start_user(name)
        key = NodeKey.load_or_create(tmp_path / "m")  # the key the session's engine loads from its workdir
        cl.start_user("m", wrap=lambda plane: HugeScalePlane(plane, key, cl.run.reference))
        outcomes = cl.wait_all()
    assert all(outcomes[n] == {"done": True} for n in HONEST), outcomes
    assert "evicted" in outcomes["m"].get("refused", ""), outcomes["m"]  # step() raised JoinRefused
    check_consistent(cl, HONEST)
    assert "4 of its last 4 frames were clipped or rejected" in cl.run.evicted["m"]
    for name in HONEST:
        node = cl.nodes[name]
        assert isinstance(node, UserNode)
        log = cl.applied(name)
        dropped = [r for r in node.reports if r.committed and r.robust is not None and "m" in r.robust["members"]]
        assert [r.round for r in dropped][:1] == [0] and len(dropped) == 4, [r.round for r in dropped]
        for report in dropped:
            m = report.robust["members"]["m"]
            assert "absurd, rejected" in m["rejected"] and m["norm_ratio"] > 1e20, m
            assert set(report.members) == {*HONEST, "m"}
            assert log[report.round]["robust"] == report.robust  # what step() returned is what rounds.jsonl holds
        assert "m" in dropped[-1].robust["evicted"]
        assert all(math.isfinite(r.loss) and r.loss < math.log(256) + 0.5 for r in node.reports if r.committed)
    hostile = cl.nodes["m"]
    assert isinstance(hostile, UserNode) and hostile.session is not None
    assert hostile.session.done  # refused: a loop ``while not session.done`` ends; close() left as the daemon does
