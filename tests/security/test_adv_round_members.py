"""Adversarial review (adv-today) of the member count bound a member reads a Collect result under
(node/transport/limits.py ``ResultLimits.members`` = the join's ``num_shards`` = ``membership.max_nodes``) against what
the coordinator commits. The coordinator core is driven directly (tests/unit/coordinator/core_harness.py): real
frames, real signatures; the result is then read the way a member reads it (node/transport/grpc_result.py).

- ``test_round_0_never_holds_more_payloads_than_max_nodes`` — the finding, fixed: while the run waits for
  ``min_nodes`` members, every joiner entered round 0, and the payload of a member that left still counted. Nodes
  that submit, then leave (a crash at start-up, a preempted machine replaced by one with another name — or one member
  with the join token cycling through fresh names and keys) left round 0 with more payloads than ``max_nodes``: every
  member then refused the round's result as MALFORMED ("the result names 3 members, more than the run's 2"), and the
  coordinator held any number of frames for it. Now a joiner enters the open round only while the members and the
  departed members' payloads leave it room (coordinator/core.py ``join``); otherwise it starts with the next round.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "coordinator"))

from coordinator.errors import Late  # noqa: E402
from core_harness import Clock, Harness  # noqa: E402
from node.proto.lowband.v1 import coordinator_pb2 as pb  # noqa: E402
from node.transport.grpc_result import assemble  # noqa: E402
from node.transport.limits import ResultLimits  # noqa: E402
from node.transport.messages import RoundStatus  # noqa: E402

MAX_NODES = 2


def _read_as_member(result: Any, limits: ResultLimits) -> Any:
    """The result as a member reads it from a Collect stream: a header, then each frame in one piece."""
    names = sorted(result.frames)
    chunks = [pb.CollectChunk(header=pb.CollectHeader(round=0, committed=True, members=names,
                                                      payload_sizes=[len(result.frames[n]) for n in names]))]
    chunks += [pb.CollectChunk(piece=pb.PayloadPiece(member=i, offset=0, data=result.frames[n]))
               for i, n in enumerate(names)]
    return assemble(iter(chunks), 0, None, "", limits)


def test_round_0_never_holds_more_payloads_than_max_nodes(tmp_path: Path) -> None:
    h = Harness(tmp_path / "state", Clock(), {"membership": {"min_nodes": MAX_NODES, "max_nodes": MAX_NODES}})
    try:
        first = h.join("a")
        h.submit("a", 0)
        h.core.leave(h.ids["a"], "crashed at start-up")  # its payload keeps counting
        late = h.join("c")  # another machine, another name, while the run still waits for min_nodes members
        if late["first_round"] == 0:
            h.submit("c", 0)
        if h.join("b")["first_round"] == 0:
            h.submit("b", 0)
        result, _ = h.core.collect(h.ids["b"], 0, 0.0, False)
        assert len(result.frames) <= first["num_shards"] == MAX_NODES, sorted(result.frames)
        limits = ResultLimits(frame=1 << 20, aggregate=1 << 20, members=first["num_shards"], state=1 << 30)
        read = _read_as_member(result, limits)
        assert read.status is RoundStatus.COMMITTED, read.reason
    finally:
        h.close()


def test_a_node_that_restarts_while_the_run_waits_still_enters_round_0(tmp_path: Path) -> None:
    """What held (and must keep holding with the fix): while the run waits for ``min_nodes`` members, a member
    replaced by its own new session (same name and key) after it submitted enters round 0 again; its payload counts
    once, for the new session: the round closes with b's payload, and the new session's own offer comes late."""
    h = Harness(tmp_path / "state", Clock(), {"membership": {"min_nodes": MAX_NODES, "max_nodes": MAX_NODES}})
    try:
        h.join("a")
        h.submit("a", 0)
        again = h.join("a")  # a restarted: its new session replaces the old one
        assert again["replaced"] and again["first_round"] == 0
        h.join("b")
        h.submit("b", 0)
        with pytest.raises(Late):  # the new session sends its payload (it does not know the old one's arrived)
            h.submit("a", 0)
        result, _ = h.core.collect(h.ids["b"], 0, 0.0, True)
        assert sorted(result.frames) == ["a", "b"]
    finally:
        h.close()
