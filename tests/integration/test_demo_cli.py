"""``lowband demo``: a coordinator and three nodes as processes, end to end, with a summary and a plot."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from lowband_cluster import Cluster, rounds_table


@pytest.mark.timeout(150)
def test_demo_runs_to_the_end_and_writes_a_plot(cluster: Cluster, tmp_path: Path) -> None:
    demo = cluster.spawn("demo", ["demo", "--rounds", "3", "--H", "2", "--workdir", str(tmp_path / "demo")])
    assert demo.wait_exit(timeout_s=130) == 0, demo.log_text()[-3000:]
    out = demo.stdout.read_text()
    assert "summary: 3 rounds committed" in out, out
    lines = re.findall(r"^round +(\d+)/3: members=[23] ", out, re.M)
    assert lines == ["0", "1", "2"], out  # one line per round, in order
    # each line carries the round's validation loss whenever the coordinator scored it (a line waits for it)
    rows = rounds_table(tmp_path / "demo" / "state")
    assert [r.round for r in rows] == [0, 1, 2]
    assert not math.isnan(rows[-1].val_loss)  # the coordinator finishes the last evaluation before it exits
    for row in rows:
        line = re.search(rf"^round +{row.round}/3: .*$", out, re.M)
        assert line, out
        if math.isnan(row.val_loss):
            assert "val_loss" not in line.group(0), (line.group(0), row)
        else:
            assert f" val_loss={row.val_loss:.4f} " in line.group(0), (line.group(0), row)
    plot = re.search(r"^  plot: (.+)$", out, re.M)
    assert plot, out
    path = Path(plot.group(1).strip())
    assert path.is_file() and path.stat().st_size > 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
