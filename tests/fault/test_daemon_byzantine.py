"""A hostile member among real daemons on an in-process run: it submits well-formed, correctly signed frames whose
magnitudes are 1e25 × its honest update (the incident of issue 14). With the recommended ``reduce`` settings every
replica drops or clips those frames alike, evicts the member after ``evict_after`` flagged frames (the run then
refuses it), and the honest replicas end bit-identical to the run's reference with sane losses."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from node import wire
from node.identity import NodeKey
from node.recipes import get_recipe
from node.robust.defaults import untrusted_overrides
from node.train.reference import Reference
from node.transport.messages import RoundResult, Submission
from daemon_harness import LocalCluster, run_config
from test_daemon_faults import check_consistent

HONEST = ("a", "b", "c")
SCALE = 1e25


class HugeScalePlane:
    """The attacker's plane: each frame its daemon offers is decoded, every magnitude buffer multiplied by ``SCALE``
    and signed again with the node's own key (the one it joined with)."""

    def __init__(self, inner: Any, key: NodeKey, reference: Reference) -> None:
        self.inner, self.key, self.ref = inner, key, reference

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def exchange(self, submission: Submission, timeout_s: float) -> RoundResult:
        ref, r = self.ref, submission.round
        env = wire.unpack(submission.frame, ref.codec, ref.spec, ref.cfg.run_id, r, extra_spec=ref.buffer_spec)
        loud = {name: {k: (v * SCALE if k in ref.codec.magnitude_buffers(enc) else v) for k, v in enc.items()}
                for name, enc in env.tensors.items()}
        frame = wire.pack(ref.cfg.run_id, r, submission.sender, ref.codec, ref.spec, loud, ref.buffer_spec, env.extra,
                          key=self.key)
        return self.inner.exchange(dataclasses.replace(submission, frame=frame), timeout_s)


def test_a_member_sending_huge_frames_is_bounded_evicted_and_the_honest_replicas_stay_sane(tmp_path: Path) -> None:
    cfg = run_config("sign", rounds=8, **untrusted_overrides(get_recipe("sign")))
    with LocalCluster(tmp_path, cfg, min_nodes=3) as cl:
        cl.run.start_when(4)
        for name in HONEST:
            cl.start(name)
        key = NodeKey.load_or_create(tmp_path / "m")
        cl.start("m", wrap=lambda plane: HugeScalePlane(plane, key, cl.run.reference))
        outcomes = cl.wait_all()
    assert all(outcomes[n] == {"code": 0} for n in HONEST), outcomes
    assert outcomes["m"] == {"code": 3}, outcomes["m"]  # evicted, then refused when it joined again
    check_consistent(cl, HONEST)
    log = cl.applied("a")
    dropped = [r for r, e in sorted(log.items()) if "m" in e["robust"]["members"]]
    # four frames, then evicted (a node whose frame missed two rounds in a row sits one out: it may skip one)
    assert len(dropped) == 4 and dropped[0] == 0, dropped
    for r in dropped:
        m = log[r]["robust"]["members"]["m"]
        assert "absurd, rejected" in m["rejected"] and m["norm_ratio"] > 1e20, m
        assert set(log[r]["members"]) == {*HONEST, "m"}
    assert "m" in log[dropped[-1]]["robust"]["evicted"]
    assert all("evicted" not in log[r]["robust"] for r in dropped[:-1])
    assert "4 of its last 4 frames were clipped or rejected" in cl.run.evicted["m"]
    losses = [e["loss"] for name in HONEST for e in cl.applied(name).values()]
    assert all(math.isfinite(x) and x < math.log(256) + 0.5 for x in losses), losses  # never worse than guessing
    run_ref = cl.run.reference.tensors
    assert all(float(t.abs().max()) < 10.0 for t in run_ref)  # no coordinate carried off
    assert cl.run.reference.robust is not None and cl.run.reference.robust.members["m"].rejected == 4
