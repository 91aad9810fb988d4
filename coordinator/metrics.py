"""The coordinator's metrics, built from its records: the committed rounds of its audit trail (``rounds.jsonl`` in
the state dir, ``node.roundlog``), the live membership and open round (``CoordinatorCore.status``), and the calls the
servicer refused (``Refusals``, fed by its one error path). Nothing here counts inside the round code.

``RoundHistory`` reads the audit trail incrementally (complete lines only) and keeps what the Prometheus exporter
and the dashboard (coordinator/web.py) show: totals, the round-time histograms, the last round, and the per-round
series the dashboard plots. ``CoordinatorCollector`` turns both into Prometheus metric families at scrape time
(names and units by Prometheus conventions: ``_total`` counters, ``_seconds``, ``_bytes``).
"""
from __future__ import annotations

import json
import logging
import math
import threading
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric)
from prometheus_client.registry import Collector, CollectorRegistry

from coordinator.torch_threads import torch_threads
from node.metrics import robust_tally
from node.roundlog import COORDINATOR_LOG

log = logging.getLogger(__name__)
ROUND_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
MAX_SERIES = 20_000  # rounds kept for the plots; past it every other one is dropped (the plots stay the shape)
READ_LIMIT = 8 << 20  # bytes of the audit trail read per refresh (a long trail is caught up over a few)


@dataclass
class RoundPoint:
    """One committed round as the plots need it."""

    round: int
    committed_at: float
    members: int
    bytes_in: int
    bytes_out: int
    period_s: float  # since the previous commit (NaN for the first round seen)
    spread_s: float  # first to last accepted payload
    mean_loss: float
    val_loss: float
    cumulative_bytes: int  # bytes in + out through the coordinator, this round included


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        if math.isnan(value) or value < 0:
            return
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        cumulative, total = [], 0
        for bound, count in zip([*map(_bound, self.buckets), "+Inf"], self.counts):
            total += count
            cumulative.append((bound, total))
        return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=self.sum)


def _bound(b: float) -> str:
    return format(b, "g")


def _num(value: Any, default: float = math.nan) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out


class RoundHistory:
    """The committed rounds of a coordinator's audit trail, read incrementally. Thread-safe."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / COORDINATOR_LOG
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._offset = 0
        self.points: list[RoundPoint] = []
        self._index: dict[int, int] = {}  # round → position in points
        self.committed = 0
        self.bytes_in_total = 0
        self.bytes_out_total = 0
        self.period = _Histogram(ROUND_BUCKETS)
        self.spread = _Histogram(ROUND_BUCKETS)
        self.close_kinds: Counter[str] = Counter()
        self.clipped = 0  # [recipe.reduce]: frames the bounds scaled down, dropped by reason, members evicted
        self.dropped: Counter[str] = Counter()
        self.evicted = 0
        self._last_at: float | None = None

    def refresh(self) -> None:
        """Take in the lines appended since the last call (a trail that shrank, i.e. was replaced, is read anew)."""
        with self._lock:
            try:
                size = self.path.stat().st_size
            except OSError:
                return
            if size < self._offset:
                self._reset()
            if size == self._offset:
                return
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read(min(size - self._offset, READ_LIMIT))
            except OSError as exc:
                log.debug("cannot read %s: %s", self.path, exc)
                return
            end = data.rfind(b"\n")
            if end < 0:
                return
            self._offset += end + 1
            for line in data[:end].split(b"\n"):
                self._take(line)

    def _take(self, line: bytes) -> None:
        try:
            entry = json.loads(line)
        except ValueError:
            return
        if not isinstance(entry, dict) or not isinstance(entry.get("round"), int):
            return
        r = entry["round"]
        if "committed_at" not in entry:  # the evaluator's later line: {"round": r, "val_loss": v}
            pos = self._index.get(r)
            if pos is not None:
                self.points[pos].val_loss = _num(entry.get("val_loss"))
            return
        if r in self._index:  # a line written again after a failed append: counted once
            return
        at = _num(entry.get("committed_at"), 0.0)
        bytes_in, bytes_out = int(_num(entry.get("bytes_in"), 0)), int(_num(entry.get("bytes_out"), 0))
        members = entry.get("members")
        period = at - self._last_at if self._last_at is not None else math.nan
        self._last_at = at
        self.committed += 1
        self.bytes_in_total += bytes_in
        self.bytes_out_total += bytes_out
        self.period.observe(period)
        spread = _num(entry.get("duration_s"))
        self.spread.observe(spread)
        self.close_kinds[str(entry.get("close") or "unknown")[:32]] += 1
        clipped, dropped, evicted = robust_tally(entry.get("robust"))
        self.clipped += clipped
        self.dropped.update(dropped)
        self.evicted += evicted
        self._index[r] = len(self.points)
        self.points.append(RoundPoint(r, at, len(members) if isinstance(members, list) else 0, bytes_in, bytes_out,
                                      period, spread, _num(entry.get("mean_loss")), _num(entry.get("val_loss")),
                                      self.bytes_in_total + self.bytes_out_total))
        if len(self.points) > MAX_SERIES:
            self.points = self.points[::2]
            self._index = {p.round: i for i, p in enumerate(self.points)}

    def series(self, since: int = 0, points: int = 500) -> list[RoundPoint]:
        """The rounds from ``since`` on, at most ``points`` of them (evenly thinned, the last one always kept)."""
        with self._lock:
            rows = [p for p in self.points if p.round >= since]
        if len(rows) <= points:
            return rows
        step = len(rows) / points
        picked = [rows[int(i * step)] for i in range(points - 1)]
        return [*picked, rows[-1]]

    def last(self) -> RoundPoint | None:
        with self._lock:
            return self.points[-1] if self.points else None

    def last_val_loss(self) -> float:
        with self._lock:
            return next((p.val_loss for p in reversed(self.points) if not math.isnan(p.val_loss)), math.nan)


class Refusals:
    """Calls the servicer refused, by method and reason (the domain error's kind): fed by its one error path."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[tuple[str, str]] = Counter()

    def __call__(self, method: str, reason: str) -> None:
        with self._lock:
            self.counts[(method[:32], reason[:32])] += 1

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self.counts)


#: Submit refusals that are not about the frame itself (a resumable cut, a coordinator that cannot persist, a node
#: that must join again): left out of ``lowband_frames_rejected_total``.
NOT_FRAME_REJECTIONS = frozenset({"truncated", "resume_mismatch", "unavailable", "unknown_node", "unauthorized",
                                  "late"})


class CoordinatorCollector(Collector):
    """Prometheus metric families of one coordinator, computed at scrape time. ``status``: a snapshot of the core
    (``CoordinatorCore.status``); ``dense_bytes``: one member's frame as dense fp32 (the compression baseline)."""

    def __init__(self, history: RoundHistory, status: Callable[[], dict[str, Any]], refusals: Refusals,
                 dense_bytes: int, rounds_total: int) -> None:
        self.history, self.status, self.refusals = history, status, refusals
        self.dense_bytes, self.rounds_total = dense_bytes, rounds_total

    def describe(self) -> list[Metric]:
        return []  # no collect() at registration: it reads the core

    def collect(self) -> Iterator[Metric]:
        h = self.history
        h.refresh()
        s = self.status()
        with h._lock:
            yield _counter("lowband_rounds_committed", "Rounds committed by the coordinator.", h.committed)
            yield h.period.family("lowband_round_seconds", "Time from one committed round to the next.")
            yield h.spread.family("lowband_round_spread_seconds",
                                  "Time from a round's first accepted payload to its last.")
            yield _counter("lowband_bytes_received", "Payload bytes received for committed rounds.", h.bytes_in_total)
            yield _counter("lowband_bytes_sent", "Result bytes committed rounds cost to hand out.", h.bytes_out_total)
            closes = CounterMetricFamily("lowband_rounds_closed", "Committed rounds by why they closed.",
                                         labels=["close"])
            for kind, n in sorted(h.close_kinds.items()):
                closes.add_metric([kind], n)
            yield closes
            last = h.points[-1] if h.points else None
            yield _counter("lowband_frames_clipped", "Payloads the bounds scaled down in committed rounds "
                           "([recipe.reduce]).", h.clipped)
            yield _counter("lowband_members_evicted", "Members the run evicted ([recipe.reduce] evict_after).",
                           h.evicted)
            by_reason: Counter[str] = Counter(h.dropped)  # frames the bounds dropped at commit: "bound", "evicted"
        if last is not None:
            yield _gauge("lowband_round_received_bytes", "Payload bytes received in the last committed round.",
                         last.bytes_in)
            yield _gauge("lowband_round_sent_bytes", "Result bytes handed out for the last committed round.",
                         last.bytes_out)
            yield _gauge("lowband_round_members", "Members whose payload made the last committed round.",
                         last.members)
            if last.bytes_in > 0 and last.members > 0:
                yield _gauge("lowband_compression_ratio", "Dense fp32 bytes over payload bytes, last committed round.",
                             self.dense_bytes * last.members / last.bytes_in)
            yield _gauge("lowband_train_loss", "Members' mean train loss in the last committed round.", last.mean_loss)
        val = h.last_val_loss()
        if not math.isnan(val):
            yield _gauge("lowband_validation_loss", "The evaluator's loss of the reference, latest scored round.", val)
        yield _gauge("lowband_rounds", "Rounds in the run.", self.rounds_total)
        yield _gauge("lowband_open_round", "The round open now.", s["current_round"])
        yield _gauge("lowband_round_deadline_seconds", "Seconds until the open round's deadline (-1: not set).",
                     s["deadline_in_s"])
        yield _gauge("lowband_round_payloads", "Payloads received for the open round.", len(s["submitted"]))
        yield _gauge("lowband_persistence_ok", "1 while the state dir can be written (rounds are served).",
                     0 if s["persistence_error"] else 1)
        threads = GaugeMetricFamily("lowband_coordinator_torch_threads", "Threads of the coordinator's torch work, "
                                    "per pool (--torch-threads).", labels=["pool"])
        for pool, count in torch_threads().items():
            threads.add_metric([pool], count)
        yield threads
        members = s["members"]
        yield _gauge("lowband_members", "Live members of the run.", len(members))
        now = s["now"]
        age = GaugeMetricFamily("lowband_member_heartbeat_age_seconds", "Seconds since a member's last heartbeat.",
                                labels=["member"])
        contributed = CounterMetricFamily("lowband_member_rounds_contributed",
                                          "Committed rounds a member's payload made.", labels=["member"])
        m_in = CounterMetricFamily("lowband_member_bytes_received", "Bytes received from a member.",
                                   labels=["member"])
        m_out = CounterMetricFamily("lowband_member_bytes_sent", "Bytes sent to a member.", labels=["member"])
        for m in members:
            age.add_metric([m.name], max(0.0, now - m.last_heartbeat))
            contributed.add_metric([m.name], m.rounds_contributed)
            m_in.add_metric([m.name], m.bytes_in)
            m_out.add_metric([m.name], m.bytes_out)
        yield from (age, contributed, m_in, m_out)
        yield from _accountability(members, s.get("records") or {})
        refused = CounterMetricFamily("lowband_refusals", "Calls refused, by method and reason.",
                                      labels=["method", "reason"])
        rejected = CounterMetricFamily("lowband_frames_rejected", "Payloads refused, by reason.", labels=["reason"])
        late = 0
        for (method, reason), n in sorted(self.refusals.snapshot().items()):
            refused.add_metric([method, reason], n)
            if method == "Submit":
                if reason == "late":
                    late += n
                elif reason not in NOT_FRAME_REJECTIONS:
                    by_reason[reason] += n
        for reason, n in sorted(by_reason.items()):
            rejected.add_metric([reason], n)
        yield refused
        yield rejected
        yield _counter("lowband_frames_late", "Payloads that arrived after their round closed.", late)


def _accountability(members: list[Any], records: dict[str, Any]) -> Iterator[Metric]:
    """Per member, with [recipe.reduce] on: frames clipped and rejected, the latest norm ratio and cosine (the
    members' robust records, node/robust/state.py; live members and the evicted ones)."""
    live = {m.name for m in members}
    clipped = CounterMetricFamily("lowband_member_frames_clipped", "A member's frames the bounds scaled down.",
                                  labels=["member"])
    rejected = CounterMetricFamily("lowband_member_frames_rejected", "A member's frames the bounds rejected.",
                                   labels=["member"])
    ratio = GaugeMetricFamily("lowband_member_norm_ratio", "A member's latest frame norm over the round's reference.",
                              labels=["member"])
    cosine = GaugeMetricFamily("lowband_member_cosine", "Cosine of a member's latest frame to the round's aggregate.",
                               labels=["member"])
    evicted = GaugeMetricFamily("lowband_member_evicted", "1 for a member the run evicted.", labels=["member"])
    for name, r in sorted(records.items()):
        if name not in live and not r.evicted:
            continue
        clipped.add_metric([name], r.clipped)
        rejected.add_metric([name], r.rejected)
        for family, value in ((ratio, r.norm_ratio), (cosine, r.cosine)):
            if value is not None and math.isfinite(value):
                family.add_metric([name], value)
        evicted.add_metric([name], 1 if r.evicted else 0)
    yield from (clipped, rejected, ratio, cosine, evicted)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def coordinator_registry(collector: CoordinatorCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
