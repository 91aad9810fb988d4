"""``lowband bench join``: time from ``lowband node`` start to its first committed contribution.

A coordinator and two training nodes run on loopback; once the run is under way a third node starts.
We record: process start → joined (import, corpus, model build, Join), → state adopted (wait for the
open round to close + FetchState), → first committed round that holds its payload (H inner steps +
the round closing). The state download alone is compared with the goal: state bytes / link rate + 5 s.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from node.demo import _read_address, _spawn, stop_group
from node.status import fetch_status

log = logging.getLogger(__name__)

RUN = """\
[run]
id = "bench-join"
task = "gpt"
recipe = "{recipe}"
rounds = 100000
[task]
size = "{size}"
batch_size = {batch}
[recipe]
H = {H}
"inner.lr" = 1e-3
[membership]
min_nodes = 2
heartbeat_s = 1.0
lease_s = 30.0
[rounds]
initial_wait_s = 300.0
max_wait_s = 300.0
eval_every = 0
"""


def _entries(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / "rounds.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_join_bench(size: str = "tiny", recipe: str = "sign", H: int = 4, batch: int = 8, warm_rounds: int = 2,
                   timeout_s: float = 1200.0) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="lowband-bench-join-"))
    (root / "run.toml").write_text(RUN.format(recipe=recipe, size=size, H=H, batch=batch))
    procs: list[subprocess.Popen] = []
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        coord = _spawn(["coordinator", "--listen", "127.0.0.1:0", "--state-dir", str(root / "state"),
                        "--run", str(root / "run.toml")], root / "coordinator.log", stdout=subprocess.PIPE)
        procs.append(coord)
        address = _read_address(coord, 300)
        for i in range(2):
            procs.append(_spawn(["node", "--coordinator", address, "--workdir", str(root / f"n{i}"), "--name", f"n{i}",
                                 "--device", "cpu"], root / f"n{i}.log"))
        end = time.monotonic() + timeout_s
        while fetch_status(address, 30).committed_rounds < warm_rounds:
            if time.monotonic() > end:
                raise TimeoutError("the run did not get under way")
            time.sleep(0.5)
        started = time.time()
        procs.append(_spawn(["node", "--coordinator", address, "--workdir", str(root / "joiner"), "--name", "joiner",
                             "--device", "cpu"], root / "joiner.log"))
        first = state = None
        while first is None:
            if time.monotonic() > end:
                raise TimeoutError("the joiner did not contribute in time")
            for e in _entries(root / "joiner"):
                if e.get("event") == "state" and state is None:
                    state = e
                if e.get("contributed") and first is None:
                    first = e
            time.sleep(0.2)
    finally:
        for p in reversed(procs):
            stop_group(p)
    row = {"size": size, "recipe": recipe, "H": H, "state_bytes": state["bytes"] if state else 0,
           "start_to_state_s": (state["time"] - started) if state and "time" in state else None,
           "state_download_s": state.get("download_s") if state else None,
           "start_to_first_contribution_s": first["time"] - started if "time" in first else None,
           "first_round": first["round"], "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    print(json.dumps(row, indent=2))
    return row
