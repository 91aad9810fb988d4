"""A node's metrics from the records its daemon writes (the ``rounds.jsonl`` entries), through Prometheus' text
format and parser, and served on a port of its own."""
from __future__ import annotations

import urllib.request

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from node.metrics import NodeMetrics


def _samples(m: NodeMetrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(m.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


ROUND = {"round": 3, "members": ["a", "b"], "contributed": True, "loss": 2.5, "bytes_out": 1000, "bytes_in": 1000,
         "train_s": 3.0, "wait_s": 1.0, "rejected": {}, "steps": 12, "dense_bytes": 32000, "time": 1.0}


def test_rounds_and_states_become_metrics() -> None:
    m = NodeMetrics("n0", started=0.0)
    m.observe({"event": "state", "committed_rounds": 3, "bytes": 5000, "download_s": 2.5,
               "why": "join, downloaded while starting up"})
    m.observe({"round": 2, "members": ["a", "b"], "contributed": False, "observed": True, "fingerprint": "f"})
    m.observe(ROUND)
    m.observe({**ROUND, "round": 4, "skipped_steps": 2, "rejected": {"b": "bad digest"}, "wait_s": 3.0})
    s = _samples(m)
    assert s[("lowband_rounds_committed_total", (("contributed", "true"),))] == 2
    assert s[("lowband_rounds_committed_total", (("contributed", "false"),))] == 1
    assert s[("lowband_bytes_sent_total", ())] == 2000
    assert s[("lowband_bytes_received_total", ())] == 7000  # two results and the state
    assert s[("lowband_round_seconds_count", ())] == 2 and s[("lowband_round_seconds_sum", ())] == 10.0
    assert s[("lowband_compression_ratio", ())] == 32.0
    assert s[("lowband_inner_steps_per_second", ())] == 4.0
    assert s[("lowband_communication_ratio", ())] == 0.5
    assert s[("lowband_nonfinite_steps_skipped_total", ())] == 2
    assert s[("lowband_frames_rejected_total", (("reason", "invalid"),))] == 1
    assert s[("lowband_frames_rejected_total", (("reason", "bound"),))] == 0  # present from the start
    assert s[("lowband_state_downloads_total", (("why", "join"),))] == 1
    assert s[("lowband_state_download_seconds", ())] == 2.5
    assert s[("lowband_train_loss", ())] == 2.5 and s[("lowband_last_round", ())] == 4
    assert s[("lowband_join_seconds", ())] > 0
    assert s[("lowband_node_info", (("name", "n0"),))] == 1


def test_robust_reports_become_metrics() -> None:
    """[recipe.reduce]: the round's report in the record (clipped, dropped by the bounds or after eviction,
    evicted), observed rounds included."""
    m = NodeMetrics()
    robust = {"reference_norm": 1.0, "members": {
        "a": {"norm_ratio": 1.0, "cosine": 0.9}, "b": {"norm_ratio": 3.0, "cosine": 0.1, "clipped": 2, "factor": 0.5},
        "m": {"norm_ratio": 50.0, "cosine": None, "rejected": "tensor 'w': absurd, rejected"}},
        "evicted": {"m": "2 of its last 2 frames were clipped or rejected"}}
    m.observe({**ROUND, "robust": robust})
    later = {"reference_norm": 1.0, "members": {
        "a": {"norm_ratio": 1.0, "cosine": 0.9}, "m": {"norm_ratio": 50.0, "cosine": None, "rejected": "evicted at round 3"}}}
    m.observe({"round": 4, "members": ["a"], "contributed": False, "observed": True, "robust": later})
    m.observe({**ROUND, "round": 5, "robust": {"members": "not a map", "evicted": []}})  # malformed: nothing
    s = _samples(m)
    assert s[("lowband_frames_clipped_total", ())] == 1
    assert s[("lowband_frames_rejected_total", (("reason", "bound"),))] == 1
    assert s[("lowband_frames_rejected_total", (("reason", "evicted"),))] == 1
    assert s[("lowband_frames_rejected_total", (("reason", "invalid"),))] == 0
    assert s[("lowband_members_evicted_total", ())] == 1


def test_a_malformed_record_never_raises() -> None:
    m = NodeMetrics()
    for bad in ({}, {"round": "x"}, {"round": 1, "bytes_out": "lots", "train_s": None}, {"event": "state", "bytes": []}):
        m.observe(bad)
    assert _samples(m)[("lowband_bytes_sent_total", ())] == 0


def test_served_on_a_port_of_its_own() -> None:
    m = NodeMetrics("n0")
    m.observe(ROUND)
    port = m.serve("127.0.0.1", 0)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert b"lowband_bytes_sent_total 1000.0" in resp.read()
