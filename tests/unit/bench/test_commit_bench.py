"""`lowband bench commit` (node/bench/commit.py) on a tiny model: every round commits, in each result mode, and the
report carries the commit path's parts (no timing is asserted: benchmarks are not tests)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.bench.commit import run_commit_bench


@pytest.mark.parametrize("result", ["relay", "compressed"])
def test_the_commit_bench_commits_every_round_and_reports_its_parts(tmp_path: Path, result: str) -> None:
    out = tmp_path / "commit.json"
    report = run_commit_bench(n_layer=1, n_embd=32, n_head=2, members=2, rounds=3, out=out, result=result)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))  # what was written is the report
    assert report["result"] == result and report["members"] == 2 and len(report["rows"]) == 3
    for row in report["rows"]:
        assert {"reduce_s", "durable_s", "step_s", "commit_path_s", "submit_s", "frame_bytes"} <= set(row)
        assert row["frame_bytes"] > 0 and row["commit_path_s"] >= 0
    assert report["state_bytes"] > 0 and report["params"] > 0
