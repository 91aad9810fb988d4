"""The coordinator's metrics from its records: the audit trail read incrementally (torn and repeated lines, the
evaluator's later lines, a replaced file), the live status, and refusals by reason; checked through Prometheus'
own text format and parser."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.metrics import CoordinatorCollector, Refusals, RoundHistory, coordinator_registry
from coordinator.errors import BadPayload, BadSignature, Late, Truncated
from coordinator.servicer import refusal_reason
from node.robust.report import MemberReport, RoundReport
from node.robust.state import MemberRecord
from node.roundlog import RoundRow


def _row(r: int, at: float, bytes_in: int = 300, spread: float = 0.5) -> str:
    return RoundRow(r, at, ["a", "b", "c"], "all submitted", "f" * 16, bytes_in, 2 * bytes_in, spread, 2.0,
                    float("nan"), "all_submitted").to_json()


def _status() -> dict[str, Any]:
    member = SimpleNamespace(name="a", last_heartbeat=9.0, rounds_contributed=4, bytes_in=1200, bytes_out=2400)
    return {"current_round": 4, "deadline_in_s": 3.5, "submitted": ["a"], "persistence_error": "",
            "members": [member], "now": 10.0}


def _samples(history: RoundHistory, refusals: Refusals | None = None,
             status: Any = _status) -> dict[tuple[str, tuple], float]:
    registry = coordinator_registry(CoordinatorCollector(history, status, refusals or Refusals(), 1000, 50))
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_rounds_from_the_audit_trail(tmp_path: Path) -> None:
    log = tmp_path / "rounds.jsonl"
    log.write_text("\n".join([_row(0, 100.0), _row(1, 103.0), json.dumps({"round": 0, "val_loss": 2.5}),
                              _row(1, 103.0)]) + "\n" + _row(2, 110.0)[:20])  # a repeat, and a torn last line
    h = RoundHistory(tmp_path)
    s = _samples(h)
    assert s[("lowband_rounds_committed_total", ())] == 2
    assert s[("lowband_bytes_received_total", ())] == 600 and s[("lowband_bytes_sent_total", ())] == 1200
    assert s[("lowband_round_seconds_count", ())] == 1 and s[("lowband_round_seconds_sum", ())] == 3.0
    assert s[("lowband_round_seconds_bucket", (("le", "2"),))] == 0
    assert s[("lowband_round_seconds_bucket", (("le", "5"),))] == 1
    assert s[("lowband_round_spread_seconds_count", ())] == 2
    assert s[("lowband_validation_loss", ())] == 2.5
    assert s[("lowband_compression_ratio", ())] == 1000 * 3 / 300
    assert s[("lowband_members", ())] == 1 and s[("lowband_open_round", ())] == 4
    assert s[("lowband_member_heartbeat_age_seconds", (("member", "a"),))] == 1.0
    assert s[("lowband_member_bytes_received_total", (("member", "a"),))] == 1200
    # the torn line completes: it counts once, and the period since round 1 is observed
    with open(log, "a") as f:
        f.write(_row(2, 110.0)[20:] + "\n")
    s = _samples(h)
    assert s[("lowband_rounds_committed_total", ())] == 3 and s[("lowband_round_seconds_sum", ())] == 10.0
    assert [p.round for p in h.series()] == [0, 1, 2] and h.series()[2].cumulative_bytes == 2700
    # a trail replaced by a shorter one (another run in this state dir) is read anew
    log.write_text(_row(0, 50.0) + "\n")
    assert _samples(h)[("lowband_rounds_committed_total", ())] == 1


def test_garbage_lines_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "rounds.jsonl").write_text("not json\n[1,2]\n{\"round\": \"x\"}\n" + _row(0, 1.0) + "\n")
    assert _samples(RoundHistory(tmp_path))[("lowband_rounds_committed_total", ())] == 1


def test_refusals_by_method_and_reason_and_frames_late_or_rejected(tmp_path: Path) -> None:
    refusals = Refusals()
    for exc in (Late("closed"), Late("closed"), BadPayload("bad digest"), Truncated("cut")):
        refusals("Submit", refusal_reason(exc))
    refusals("Collect", "still_open")
    s = _samples(RoundHistory(tmp_path), refusals)
    assert s[("lowband_frames_late_total", ())] == 2
    assert s[("lowband_frames_rejected_total", (("reason", "bad_payload"),))] == 1
    assert ("lowband_frames_rejected_total", (("reason", "truncated"),)) not in s  # a resumable cut, not a refusal
    assert s[("lowband_refusals_total", (("method", "Submit"), ("reason", "late")))] == 2
    assert s[("lowband_refusals_total", (("method", "Collect"), ("reason", "still_open")))] == 1
    assert "lowband_validation_loss" not in {name for name, _ in s}  # nothing scored yet: absent, not 0


def test_accountability_with_reduce_on(tmp_path: Path) -> None:
    """[recipe.reduce]: frames clipped and dropped by the bounds (from the robust reports in the audit trail), frames
    refused for their signature (at Submit), evictions, and each member's record."""
    def report(r: int, evicted: dict[str, str]) -> dict[str, Any]:
        return RoundReport(r, 1.0, {"a": MemberReport("a", 1.0, 1.0, 0.9),
                                    "b": MemberReport("b", 3.0, 3.0, 0.2, clipped=2, factor=0.6),
                                    "m": MemberReport("m", 99.0, 99.0, None, rejected="tensor 'w': absurd, rejected")},
                           evicted=evicted).to_json()
    rows = [RoundRow(r, 100.0 + r, ["a", "b", "m"], "all submitted", "f" * 16, 300, 600, 0.5, 2.0, float("nan"),
                     "all_submitted", report(r, {"m": "2 of its last 2 frames"} if r else {})).to_json()
            for r in range(2)]
    (tmp_path / "rounds.jsonl").write_text("\n".join(rows) + "\n")
    refusals = Refusals()
    for exc in (BadSignature("payload rejected: signature does not verify"), BadPayload("bad digest")):
        refusals("Submit", refusal_reason(exc))
    records = {"a": MemberRecord(frames=2, norm_ratio=1.0, cosine=0.9),
               "b": MemberRecord(frames=2, clipped=2, norm_ratio=3.0, cosine=0.2),
               "m": MemberRecord(frames=2, rejected=2, evicted_at=1, reason="2 of its last 2 frames", norm_ratio=99.0),
               "gone": MemberRecord(frames=1)}  # neither live nor evicted: not shown

    def status() -> dict[str, Any]:
        return {**_status(), "members": [SimpleNamespace(name=n, last_heartbeat=9.0, rounds_contributed=2, bytes_in=0,
                                                         bytes_out=0) for n in ("a", "b")], "records": records}

    s = _samples(RoundHistory(tmp_path), refusals, status)
    assert s[("lowband_frames_clipped_total", ())] == 2  # b's frame in both rounds
    assert s[("lowband_frames_rejected_total", (("reason", "bound"),))] == 2
    assert s[("lowband_frames_rejected_total", (("reason", "bad_signature"),))] == 1
    assert s[("lowband_frames_rejected_total", (("reason", "bad_payload"),))] == 1
    assert s[("lowband_members_evicted_total", ())] == 1
    assert s[("lowband_member_frames_clipped_total", (("member", "b"),))] == 2
    assert s[("lowband_member_frames_rejected_total", (("member", "m"),))] == 2
    assert s[("lowband_member_norm_ratio", (("member", "b"),))] == 3.0
    assert s[("lowband_member_cosine", (("member", "a"),))] == 0.9
    assert ("lowband_member_cosine", (("member", "m"),)) not in s  # never measured: absent, not 0
    assert s[("lowband_member_evicted", (("member", "m"),))] == 1
    assert s[("lowband_member_evicted", (("member", "a"),))] == 0
    assert not any(labels == (("member", "gone"),) for _, labels in s)


def test_reduce_off_adds_no_member_accountability(tmp_path: Path) -> None:
    (tmp_path / "rounds.jsonl").write_text(_row(0, 100.0) + "\n")
    s = _samples(RoundHistory(tmp_path))
    assert s[("lowband_frames_clipped_total", ())] == 0 and s[("lowband_members_evicted_total", ())] == 0
    assert not any(name.startswith("lowband_member_frames") for name, _ in s)
