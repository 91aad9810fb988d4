"""A node's Prometheus metrics, built from its round records: every entry the daemon appends to ``rounds.jsonl`` (an
applied round, or an adopted state) passes through ``NodeMetrics.observe`` (the daemon's ``on_record`` hook), and
nothing else in the node counts. Served by prometheus_client's own HTTP server on ``--metrics-port`` (off by
default), on loopback unless ``--metrics-host`` says otherwise: the metrics hold this node's own losses and byte
counts, never a credential.

Names and units follow Prometheus conventions (``_total`` counters, ``_seconds``, ``_bytes``, ratios in 0..1).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter as Tally
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)
ROUND_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def _num(entry: dict[str, Any], key: str) -> float:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def robust_tally(robust: Any) -> tuple[int, Tally[str], int]:
    """A round's accountability report (the ``"robust"`` entry of a rounds.jsonl line, ``RoundReport.to_json``;
    ``[recipe.reduce]`` on) as counts: frames clipped, frames dropped by reason (``bound``: over a bound, or absurd;
    ``evicted``: from a member evicted before), and members the round evicted. A malformed entry counts nothing."""
    clipped, dropped = 0, Tally[str]()
    members = robust.get("members") if isinstance(robust, dict) else None
    for m in members.values() if isinstance(members, dict) else ():
        if not isinstance(m, dict):
            continue
        if isinstance(m.get("clipped"), int) and m["clipped"] > 0:
            clipped += 1
        why = m.get("rejected")
        if isinstance(why, str) and why:
            dropped["evicted" if why.startswith("evicted") else "bound"] += 1
    evicted = robust.get("evicted") if isinstance(robust, dict) else None
    return clipped, dropped, len(evicted) if isinstance(evicted, dict) else 0


class NodeMetrics:
    """The metrics of one node process. ``started``: when the process started (``time.monotonic``), for the time to
    its first committed contribution."""

    def __init__(self, name: str = "", started: float | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.started = time.monotonic() if started is None else started
        self._lock = threading.Lock()
        self._joined = False
        r = self.registry
        self.rounds = Counter("lowband_rounds_committed", "Committed rounds this node applied.", ["contributed"],
                              registry=r)
        self.round_seconds = Histogram("lowband_round_seconds", "A contributed round: inner steps plus exchange.",
                                       buckets=ROUND_BUCKETS, registry=r)
        self.sent = Counter("lowband_bytes_sent", "Payload bytes this node sent.", registry=r)
        self.received = Counter("lowband_bytes_received", "Bytes this node received (round results and states).",
                                registry=r)
        self.round_sent = Gauge("lowband_round_sent_bytes", "Payload bytes sent in the last applied round.",
                                registry=r)
        self.round_received = Gauge("lowband_round_received_bytes", "Result bytes received in the last applied round.",
                                    registry=r)
        self.ratio = Gauge("lowband_compression_ratio", "Dense fp32 frame bytes over this node's frame bytes.",
                           registry=r)
        self.steps_per_s = Gauge("lowband_inner_steps_per_second", "Inner steps per second of compute, last round.",
                                 registry=r)
        self.comm_share = Gauge("lowband_communication_ratio",
                                "Share of the last round's wall time spent waiting on the exchange (0..1).", registry=r)
        self.train_loss = Gauge("lowband_train_loss", "Mean inner-step loss of the last applied round.", registry=r)
        self.skipped = Counter("lowband_nonfinite_steps_skipped", "Inner steps skipped: non-finite loss or gradient.",
                               registry=r)
        self.rejected = Counter("lowband_frames_rejected", "Members' payloads this node refused or dropped, by reason "
                                "(invalid, a bad signature included; bound; evicted).", ["reason"], registry=r)
        for reason in ("invalid", "bound", "evicted"):  # present at 0 from the start
            self.rejected.labels(reason=reason)
        self.clipped = Counter("lowband_frames_clipped", "Members' payloads the bounds scaled down ([recipe.reduce]).",
                               registry=r)
        self.evicted = Counter("lowband_members_evicted", "Members the run evicted ([recipe.reduce] evict_after).",
                               registry=r)
        self.members = Gauge("lowband_round_members", "Members in the last applied round.", registry=r)
        self.states = Counter("lowband_state_downloads", "Run states this node adopted, by why.", ["why"], registry=r)
        self.state_seconds = Gauge("lowband_state_download_seconds", "How long the last state download took.",
                                   registry=r)
        self.state_bytes = Gauge("lowband_state_download_bytes", "Size of the last state downloaded.", registry=r)
        self.join_seconds = Gauge("lowband_join_seconds",
                                  "From the process's start to its first committed contribution.", registry=r)
        self.last_round = Gauge("lowband_last_round", "The last round this node applied.", registry=r)
        if name:
            info = Gauge("lowband_node_info", "This node (value 1).", ["name"], registry=r)
            info.labels(name=name[:64]).set(1)

    def observe(self, entry: dict[str, Any]) -> None:
        """Take one round record (the daemon's ``rounds.jsonl`` entry). Never raises: metrics must not stop a node."""
        try:
            with self._lock:
                if entry.get("event") == "state":
                    self._state(entry)
                elif isinstance(entry.get("round"), int):
                    self._round(entry)
        except Exception:  # noqa: BLE001 — a malformed record is logged, the round goes on
            log.exception("metrics: could not take a round record")

    def _state(self, entry: dict[str, Any]) -> None:
        why = str(entry.get("why", "")).split(",")[0].split(":")[0][:32] or "unknown"
        self.states.labels(why=why).inc()
        size, took = _num(entry, "bytes"), _num(entry, "download_s")
        if not math.isnan(size):
            self.state_bytes.set(size)
            self.received.inc(size)
        if not math.isnan(took):
            self.state_seconds.set(took)

    def _round(self, entry: dict[str, Any]) -> None:
        contributed = bool(entry.get("contributed"))
        self.rounds.labels(contributed=str(contributed).lower()).inc()
        self.last_round.set(entry["round"])
        members = entry.get("members")
        if isinstance(members, list):
            self.members.set(len(members))
        clipped, dropped, evicted = robust_tally(entry.get("robust"))  # every applied round's
        self.clipped.inc(clipped)
        self.evicted.inc(evicted)
        for reason, n in dropped.items():
            self.rejected.labels(reason=reason).inc(n)
        if entry.get("observed"):
            return  # applied without contributing: no train, exchange or bytes of its own
        sent, got = _num(entry, "bytes_out"), _num(entry, "bytes_in")
        train, wait = _num(entry, "train_s"), _num(entry, "wait_s")
        for value, gauge, counter in ((sent, self.round_sent, self.sent), (got, self.round_received, self.received)):
            if not math.isnan(value):
                gauge.set(value)
                counter.inc(value)
        if not math.isnan(train) and not math.isnan(wait):
            self.round_seconds.observe(train + wait)
            if train + wait > 0:
                self.comm_share.set(wait / (train + wait))
        steps = _num(entry, "steps")
        if not math.isnan(steps) and not math.isnan(train) and train > 0:
            self.steps_per_s.set(steps / train)
        dense = _num(entry, "dense_bytes")
        if not math.isnan(dense) and sent > 0:
            self.ratio.set(dense / sent)
        loss = _num(entry, "loss")
        if not math.isnan(loss):
            self.train_loss.set(loss)
        skipped = _num(entry, "skipped_steps")
        if not math.isnan(skipped) and skipped > 0:
            self.skipped.inc(skipped)
        rejected = entry.get("rejected")
        if isinstance(rejected, (dict, list)) and rejected:
            self.rejected.labels(reason="invalid").inc(len(rejected))
        if contributed and not self._joined:
            self._joined = True
            self.join_seconds.set(time.monotonic() - self.started)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on ``host:port`` (0: a free port) from a daemon thread; returns the bound port. Raises
        OSError when it cannot bind."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
