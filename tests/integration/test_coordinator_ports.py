"""A coordinator restarted with port 0 binds the ports it had before (gRPC, dashboard, metrics), remembered in its
state dir, and says so; a port given explicitly wins. Real processes on 127.0.0.1."""
from __future__ import annotations

import json
from pathlib import Path

from lowband_cluster import Cluster, printed, terminate, write_run_file


def _start(cluster: Cluster, run: Path, state: Path) -> tuple[str, str, str]:
    coord = cluster.coordinator(run, state, extra=("--http-port", "0", "--metrics-port", "0"))
    urls = (coord.address, printed(coord, "lowband coordinator dashboard on "),
            printed(coord, "lowband coordinator metrics on "))
    assert terminate(coord) == [0]
    return urls


def test_a_restart_with_port_0_binds_the_remembered_ports(cluster: Cluster, tmp_path: Path) -> None:
    run, state = write_run_file(tmp_path / "run.toml"), tmp_path / "state"
    first = _start(cluster, run, state)
    remembered = json.loads((state / "listen.json").read_text())
    assert remembered == {"port": int(first[0].rsplit(":", 1)[1]),
                          "http_port": int(first[1].rsplit(":", 1)[1].strip("/")),
                          "metrics_port": int(first[2].rsplit(":", 1)[1].split("/")[0])}
    assert _start(cluster, run, state) == first
