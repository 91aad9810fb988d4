"""The arithmetic and the writer of ``lowband bench scale`` (node/bench/scale_report.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from node.bench.scale_report import (ScaleRow, cpu_seconds, percentile, round_latency, rss_by_mapping,
                                     status_bytes, status_count, table, transfer_seconds, write_results)


def test_percentile_interpolates_between_order_statistics() -> None:
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.9) == pytest.approx(3.7)  # numpy's linear rule
    assert percentile([5.0], 0.9) == 5.0
    assert math.isnan(percentile([], 0.5))


def test_a_round_runs_from_the_first_submit_to_the_last_result() -> None:
    assert round_latency([10.0, 9.5, 11.0], [12.0, 13.25, 12.5]) == 3.75


def test_the_transfer_time_is_the_bytes_at_the_measured_throughput() -> None:
    assert transfer_seconds(5e8, 1e9) == 0.5


def test_cpu_seconds_are_user_plus_system_ticks_even_with_a_parenthesis_in_the_name() -> None:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    stat = "42 (we) (ird) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1 2 3"
    assert cpu_seconds(stat, 100) == 3.0


def test_memory_and_thread_lines_of_proc_status() -> None:
    status = "Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nThreads:\t17\n"
    assert status_bytes(status, "VmHWM") == 2 << 20
    assert status_bytes(status, "VmRSS") == 1 << 20
    assert status_count(status, "Threads") == 17
    with pytest.raises(KeyError):
        status_bytes(status, "VmSwap")


def test_the_serverless_sides_dict_is_read_into_the_same_row() -> None:
    row = ScaleRow.from_mapping({"peers": 64, "bytes_up_per_peer_round": 3000, "bytes_down_per_peer_round": 2000,
                                 "payload_bytes": 1000, "round_latency_s": {"median": 1.5, "p90": 2.0},
                                 "cpu_s_per_round": 0.25, "peak_rss_bytes": 1 << 30})
    assert (row.plane, row.mode, row.n) == ("dht", "dht", 64)
    assert row.bytes_up_per_node_round == 3000 and row.down_per_payload == 2.0
    assert (row.round_latency_s_median, row.round_latency_s_p90) == (1.5, 2.0)
    assert ScaleRow.from_mapping(row.to_dict()) == row  # the JSON form reads back
    with pytest.raises(ValueError, match="unknown field 'peer'"):
        ScaleRow.from_mapping({"peer": 3})


def test_results_merge_by_setting_and_every_plot_is_written(tmp_path: Path) -> None:
    first = [ScaleRow("coordinator", "relay", 16, payload_bytes=10, bytes_down_per_node_round=150,
                      round_latency_s_median=1.0, round_latency_s_p90=1.2, cpu_s_per_round=0.5, peak_rss_bytes=1 << 30),
             ScaleRow("coordinator", "compressed", 16, error="this tree refuses it")]
    write_results(first, tmp_path, {"command": "one"})
    again = ScaleRow("coordinator", "relay", 16, payload_bytes=10, bytes_down_per_node_round=150,
                     round_latency_s_median=2.0, round_latency_s_p90=2.5, cpu_s_per_round=0.5, peak_rss_bytes=1 << 30)
    path = write_results([again, ScaleRow("coordinator", "relay", 64, payload_bytes=10)], tmp_path,
                         {"command": "two"})
    doc = json.loads(path.read_text())
    assert [r["command"] for r in doc["runs"]] == ["one", "two"]
    rows = {(r["mode"], r["n"]): ScaleRow.from_mapping(r) for r in doc["rows"]}
    assert set(rows) == {("relay", 16), ("relay", 64), ("compressed", 16)}
    assert rows[("relay", 16)].round_latency_s_median == 2.0  # measured again: the new row replaced the old one
    for stem in ("latency", "bytes_down", "rss", "cpu"):
        assert (tmp_path / f"{stem}_vs_n.png").stat().st_size > 0
    md = (tmp_path / "scale.md").read_text()
    assert "not measured: this tree refuses it" in md and md == table(sorted(rows.values(), key=lambda r: (
        r.plane, r.mode, r.n))) + "\n"


def test_resident_memory_is_split_by_kind_of_mapping() -> None:
    smaps = "\n".join([
        "55d0-55e0 rw-p 00000000 00:00 0    [heap]", "Size: 4096 kB", "Rss: 1000 kB",
        "7f00-7f80 rw-p 00000000 00:00 0 ", "Size: 8192 kB", "Rss: 20 kB",  # a thread's stack
        "7f80-7f90 rw-p 00000000 00:00 0 ", "Size: 65536 kB", "Rss: 30000 kB",  # a malloc arena
        "7f90-7fa0 rw-p 00000000 00:00 0 ", "Size: 300000 kB", "Rss: 200000 kB",  # a large block
        "7fa0-7fb0 r-xp 00000000 08:01 42   /usr/lib/libc.so.6", "Size: 2000 kB", "Rss: 1500 kB",
        "7ffc-7ffd rw-p 00000000 00:00 0    [stack]", "Size: 132 kB", "Rss: 40 kB"])
    assert rss_by_mapping(smaps) == {"heap": 1000 * 1024, "thread_stacks": 20 * 1024, "malloc_arenas": 30000 * 1024,
                                     "large_anonymous": 200000 * 1024, "files": 1500 * 1024}
