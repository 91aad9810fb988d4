"""``lowband bench coordinator`` end to end on the tiny model: a real coordinator process and 2 client threads play
one measured round (the bench's frames are signed, as coordinators require since protocol 2), in relay and in
aggregate mode; the temporary state directories are gone afterwards, or kept with ``keep``."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from node.bench.coordinator import run_coordinator_bench


@pytest.mark.parametrize("result,keep", [("relay", False), ("aggregate", True)])
def test_the_bench_plays_its_rounds_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, result: str,
                                                  keep: bool) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # tempfile's documented default-directory setting
    rows = run_coordinator_bench([2], 1, size="tiny", out=tmp_path / "out", result=result, aggregate_codec="bf16",
                                 keep=keep)
    assert [(r["nodes"], r["result"], r["torch_threads"]) for r in rows] == [(2, result, 1)]
    assert rows[0]["bytes_per_round"] > 0
    assert (tmp_path / "out" / "coordinator.json").exists()
    left = [p for p in tmp_path.iterdir() if p.name.startswith("lowband-bench-coord-")]
    if keep:
        assert len(left) == 1 and (left[0] / "nodes-2" / "state").is_dir()
    else:
        assert left == []
