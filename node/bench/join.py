"""``lowband bench join``: time from ``lowband node`` start to its first committed contribution.

Coordinator mode: a coordinator and two training nodes run on loopback; once the run is under way a third node
starts. DHT mode (``--dht --donors N``): a bootstrap peer and N training nodes; the joiner downloads the state
from all N at once (chunks spread over the donors).
We record: process start → state adopted (import, corpus, model build, join, wait for the open round to close,
download), → first committed round that holds its payload (H inner steps + the round closing). The state
transfer alone is compared with the goal: state bytes / link rate + 5 s.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from node.bench.procs import child_env, read_coordinator_address, read_dht_address, spawn_lowband, stop_group
from node.roundlog import applied_rounds, read_round_log
from node.runfile import build_run_file

log = logging.getLogger(__name__)


def join_run_file(recipe: str, size: str, H: int, batch: int, min_nodes: int) -> str:
    """The bench's run: endless rounds that wait long for everyone, no evaluation."""
    return build_run_file(run_id="bench-join", recipe=recipe, rounds=100_000,
                          task_params={"size": size, "batch_size": batch}, recipe_overrides={"H": H, "inner.lr": 1e-3},
                          membership={"min_nodes": min_nodes, "heartbeat_s": 1.0, "lease_s": 30.0},
                          rounds_policy={"initial_wait_s": 300.0, "max_wait_s": 300.0, "eval_every": 0})


def run_join_bench(size: str = "tiny", recipe: str = "sign", H: int = 4, batch: int = 8, warm_rounds: int = 2,
                   timeout_s: float = 1200.0, dht: bool = False, donors: int = 2) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="lowband-bench-join-"))
    (root / "run.toml").write_text(join_run_file(recipe, size, H, batch, min_nodes=donors if dht else 2))
    if dht:  # serverless runs are signed by their authority; open: the bench's nodes need no grants
        from node.transport.dht_authority import init_run

        init_run(root / "run.toml", root / "run.toml", root / "authority.key", open_run=True)
    procs: list[subprocess.Popen] = []
    env = child_env()
    run = ["--run", str(root / "run.toml")]

    def spawn(args: list[str], log_name: str, stdout: int | None = None) -> subprocess.Popen:
        procs.append(spawn_lowband(args, root / log_name, stdout=stdout, env=env))
        return procs[-1]

    try:
        if dht:
            boot = spawn(["dht", "--listen", "/ip4/127.0.0.1/tcp/0"], "dht.log", stdout=subprocess.PIPE)
            where = ["--dht", "--initial-peers", read_dht_address(boot, 120), "--listen", "/ip4/127.0.0.1/tcp/0", *run]
        else:
            coord = spawn(["coordinator", "--listen", "127.0.0.1:0", "--state-dir", str(root / "state"), *run],
                          "coordinator.log", stdout=subprocess.PIPE)
            where = ["--coordinator", read_coordinator_address(coord, 300)]
        n_donors = donors if dht else 2
        for i in range(n_donors):
            spawn(["node", *where, "--workdir", str(root / f"n{i}"), "--name", f"n{i}", "--device", "cpu"], f"n{i}.log")
        end = time.monotonic() + timeout_s
        while len(applied_rounds(root / "n0")) < warm_rounds:
            if time.monotonic() > end or any(p.poll() is not None for p in procs):
                raise TimeoutError(f"the run did not get under way (logs in {root})")
            time.sleep(0.5)
        started = time.time()
        spawn(["node", *where, "--workdir", str(root / "joiner"), "--name", "joiner", "--device", "cpu"], "joiner.log")
        first = state = None
        while first is None:
            if time.monotonic() > end or procs[-1].poll() is not None:
                raise TimeoutError(f"the joiner did not contribute in time (logs in {root})")
            for e in read_round_log(root / "joiner"):
                if e.get("event") == "state" and state is None:
                    state = e
                if e.get("contributed") and first is None:
                    first = e
            time.sleep(0.2)
    finally:
        for p in reversed(procs):
            stop_group(p)
    row: dict[str, Any] = {
        "mode": "dht" if dht else "coordinator", "donors": n_donors if dht else 1, "size": size, "recipe": recipe,
        "H": H, "state_bytes": state["bytes"] if state else 0,
        "start_to_state_s": (state["time"] - started) if state and "time" in state else None,
        "state_fetch_s": state.get("download_s") if state else None,
        "start_to_first_contribution_s": first["time"] - started if "time" in first else None,
        "first_round": first["round"], "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    if dht:  # the joiner logs the pure transfer time and what each donor served
        m = re.search(r"fetched the state .*\(transfer ([\d.]+) s\) from (\d+) donors \((.*)\)",
                      (root / "joiner.log").read_text(errors="replace"))
        if m:
            row.update(transfer_s=float(m.group(1)), donors_used=int(m.group(2)), per_donor=m.group(3))
    print(json.dumps(row, indent=2))
    return row
