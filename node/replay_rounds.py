"""A node never goes back: when the state it adopts is older than its own (a coordinator's newest snapshot can be
up to ``keep_results`` rounds old), it replays the rounds in between from their results."""
from __future__ import annotations

import logging
import threading

from node.train.worker import Worker
from node.transport.control import ControlPlane

log = logging.getLogger("node.daemon")  # the daemon's log lines keep their logger name


def replay_to(name: str, plane: ControlPlane, worker: Worker, stop: threading.Event, timeout_s: float, ours: int,
              committed: int, fingerprint: str) -> tuple[int, str]:
    """The state adopted holds ``committed`` rounds, fewer than the ``ours`` this node held: apply the rounds in
    between from their results (the node's trail already has them: they are not logged again), so that the node
    never goes back. Returns the (committed rounds, fingerprint) reached; where a round cannot be applied from its
    result alone, the node stays where it got to and catches up as usual. Raises RuntimeError when a replayed round
    does not give the run's fingerprint (a replica-consistent recipe)."""
    while committed < ours and not stop.is_set():
        result = plane.observe(committed, timeout_s, worker.fingerprint())
        if result.state_needed or not worker.apply_observed(result):
            log.warning("[node=%s] the state is %d rounds behind ours and round %d cannot be replayed (%s)",
                        name, ours - committed, committed, result.reason or result.status.value)
            break
        committed, fingerprint = worker.reference.committed_rounds, worker.fingerprint()
        if result.reference_fingerprint and fingerprint != result.reference_fingerprint and worker.replica_consistent:
            raise RuntimeError(f"replaying round {committed - 1} onto the fetched state gave fingerprint "
                               f"{fingerprint} ≠ the run's {result.reference_fingerprint}")
    return committed, fingerprint
