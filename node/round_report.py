"""What a node records of each round it applies: the ``RoundReport`` (what ``session.step()`` returns and listeners
get), the ``rounds.jsonl`` line built from it, and the log lines that go with them. The round engine (node/engine.py)
calls these from its one recording place, ``RoundEngine._record``, and for rounds it only observed.

With a recipe's ``[recipe.reduce]`` on, each round carries the robust reduce's accountability report (what the bounds
did to every member's frame, who was evicted: node/robust/report.py) under ``"robust"``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from node.robust.report import RoundReport as RobustReport
from node.train.inner import InnerStats
from node.transport.messages import RoundResult, RoundStatus

log = logging.getLogger("node.daemon")  # the daemon's log lines keep their logger name


@dataclass
class RoundReport:
    """One round as this node applied it: what ``session.step()`` returns and what ``rounds.jsonl`` records.

    ``round``: the round's number (0-based); ``status``: ``"committed"``, or why it was not — a ``RoundStatus`` value
    (``"timed_out"``, ``"no_quorum"``, ...; the round is offered again with the same frame) or ``"rejected"`` (it
    committed but this node could use none of its payloads); ``contributed``: this node's payload is in it;
    ``members``: the nodes whose payloads it combines; ``loss``: mean training loss of this node's inner steps (NaN
    when not measured); ``fingerprint``: 16 hex characters of θ_ref after the round (equal on every replica of a
    replica-consistent recipe); ``bytes_out``/``bytes_in``: this node's bytes on the wire for the round;
    ``train_s``: seconds of inner steps; ``wait_s``: seconds from sending the frame to having the result (with
    overlap, mostly hidden behind the next round's steps); ``skipped_steps``: inner steps skipped for a non-finite
    loss or gradient; ``rejected``: sender → why its payload was refused (its signature, its shape, ...);
    ``robust``: with ``[recipe.reduce]`` on, the round's accountability report as JSON (per member: norm ratio,
    cosine, clipped or rejected by the bounds; members the round evicted), else None."""

    round: int
    status: str
    contributed: bool
    members: tuple[str, ...]
    loss: float
    fingerprint: str
    bytes_out: int = 0
    bytes_in: int = 0
    train_s: float = 0.0
    wait_s: float = 0.0
    skipped_steps: int = 0
    rejected: dict[str, str] = field(default_factory=dict)
    robust: dict[str, Any] | None = None

    @property
    def committed(self) -> bool:
        return self.status == RoundStatus.COMMITTED.value


def robust_entry(node: str, report: RobustReport | None, round_: int) -> dict[str, Any] | None:
    """Round ``round_``'s accountability report as JSON (None with ``reduce`` off, or when the last report the
    reference made is another round's), and a log line for every member whose frame the bounds rejected or that the
    round evicted."""
    if report is None or report.round != round_:
        return None
    for name, m in sorted(report.members.items()):
        if m.rejected and not m.rejected.startswith("evicted"):
            log.warning("[node=%s round=%d] dropped %s's frame: %s", node, round_, name, m.rejected)
    for name, reason in sorted(report.evicted.items()):
        log.warning("[node=%s round=%d] member %s evicted (its frames are dropped from now on): %s", node, round_,
                    name, reason)
    return report.to_json()


def committed_line(node: str, report: RoundReport, result: RoundResult, reset: str, stats: InnerStats,
                   dense_bytes: int) -> dict[str, Any]:
    """The ``rounds.jsonl`` line of a round this node trained and applied (and its log lines). ``dense_bytes``: one
    frame of the model as dense fp32 (the compression baseline node/metrics.py divides by)."""
    r = report.round
    health: dict[str, object] = {"skipped_steps": stats.skipped} if stats.skipped else {}
    if reset:
        health["reset"] = reset
    if stats.skipped:
        log.warning("[node=%s round=%d] skipped %d of %d inner steps with a non-finite loss or gradient (first: %s)",
                    node, r, stats.skipped, stats.steps, stats.skip_cause)
    log.info("[node=%s round=%d] loss=%.4f members=%d contributed=%s out=%dB in=%dB train=%.2fs exchange=%.2fs fp=%s",
             node, r, report.loss, len(report.members), report.contributed, report.bytes_out, report.bytes_in,
             report.train_s, report.wait_s, report.fingerprint)
    return {"round": r, "members": list(report.members), "contributed": report.contributed,
            "fingerprint": report.fingerprint, "coordinator_fingerprint": result.reference_fingerprint,
            "loss": report.loss, "bytes_out": report.bytes_out, "bytes_in": report.bytes_in,
            "train_s": round(report.train_s, 3), "wait_s": round(report.wait_s, 3), "rejected": report.rejected,
            "steps": stats.steps, "dense_bytes": dense_bytes, **health, **({"robust": report.robust} if report.robust is not None else {})}


def observed_line(node: str, c: int, result: RoundResult, fingerprint: str, overlapped: bool,
                  robust: dict[str, Any] | None, contributed: bool = False) -> dict[str, Any]:
    """The ``rounds.jsonl`` line of a round this node applied from its result alone, not from the reply to its own
    exchange (and its log line). ``contributed``: its frame was in the round all the same (its reply was lost)."""
    log.info("[node=%s round=%d] applied %s (%s) fp=%s", node, c,
             "its own frame among the round's, the reply lost" if contributed else "without contributing",
             "observed while training the next round" if overlapped else "catching up", fingerprint)
    return {"round": c, "members": list(result.members), "contributed": contributed, "fingerprint": fingerprint,
            "coordinator_fingerprint": result.reference_fingerprint, "observed": True,
            **({"overlapped": True} if overlapped else {}), **({"robust": robust} if robust is not None else {})}
