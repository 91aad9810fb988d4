"""``lowband coordinator --torch-threads N`` sizes both of torch's thread pools in the coordinator process, before any
torch work; default 1 (issue 20: more oversubscribed 2 busy cores, 20–60× slower reduce). Read back from the
coordinator's Prometheus metrics (``lowband_coordinator_torch_threads{pool}``), parsed with Prometheus' parser."""
from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lowband_cluster import Cluster, printed, terminate, write_run_file


def _threads(cluster: Cluster, run: Path, state: Path, *flags: str) -> dict[str, float]:
    coord = cluster.coordinator(run, state, extra=("--metrics-port", "0", *flags))
    try:
        with urllib.request.urlopen(printed(coord, "lowband coordinator metrics on "), timeout=10) as resp:
            text = resp.read().decode()
    finally:
        assert terminate(coord) == [0]
    family = {f.name: f for f in text_string_to_metric_families(text)}["lowband_coordinator_torch_threads"]
    return {s.labels["pool"]: s.value for s in family.samples}


@pytest.mark.parametrize("flags,expected", [((), 1), (("--torch-threads", "3"), 3)], ids=["default", "three"])
def test_the_coordinator_sizes_torchs_pools(cluster: Cluster, tmp_path: Path, flags: tuple[str, ...],
                                            expected: int) -> None:
    run = write_run_file(tmp_path / "run.toml")
    assert _threads(cluster, run, tmp_path / "state", *flags) == {"intra": expected, "interop": expected}
