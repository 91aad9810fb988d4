"""``lowband demo``: a coordinator and three nodes as processes, end to end, with a summary and a plot."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from lowband_cluster import Cluster


@pytest.mark.timeout(150)
def test_demo_runs_to_the_end_and_writes_a_plot(cluster: Cluster, tmp_path: Path) -> None:
    demo = cluster.spawn("demo", ["demo", "--rounds", "3", "--H", "2", "--workdir", str(tmp_path / "demo")])
    assert demo.wait_exit(timeout_s=130) == 0, demo.log_text()[-3000:]
    out = demo.stdout.read_text()
    assert "summary: 3 rounds committed" in out, out
    for r in range(3):
        assert re.search(rf"^round +{r}/3: members=[23] ", out, re.M), out
    plot = re.search(r"^  plot: (.+)$", out, re.M)
    assert plot, out
    path = Path(plot.group(1).strip())
    assert path.is_file() and path.stat().st_size > 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
