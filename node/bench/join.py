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

from node.demo import _read_address, _spawn, stop_group
from node.roundlog import read_round_log

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




def _dht_address(proc: subprocess.Popen, log_path: Path, timeout_s: float) -> str:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the DHT peer exited with {proc.returncode}")
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith("lowband dht peer ") and "/127.0.0.1/" in line:
                return line.rsplit(" ", 1)[-1].strip()
        time.sleep(0.2)
    raise TimeoutError("the DHT peer printed no address")


def _applied(workdir: Path) -> int:
    return sum(1 for e in read_round_log(workdir) if "round" in e)


def run_join_bench(size: str = "tiny", recipe: str = "sign", H: int = 4, batch: int = 8, warm_rounds: int = 2,
                   timeout_s: float = 1200.0, dht: bool = False, donors: int = 2) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="lowband-bench-join-"))
    (root / "run.toml").write_text(RUN.format(recipe=recipe, size=size, H=H, batch=batch).replace(
        "min_nodes = 2", f"min_nodes = {donors if dht else 2}"))
    procs: list[subprocess.Popen] = []
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run = ["--run", str(root / "run.toml")]
    try:
        if dht:
            boot = _spawn(["dht", "--listen", "/ip4/127.0.0.1/tcp/0"], root / "dht.log")
            procs.append(boot)
            where = ["--dht", "--initial-peers", _dht_address(boot, root / "dht.log", 120),
                     "--listen", "/ip4/127.0.0.1/tcp/0", *run]
        else:
            coord = _spawn(["coordinator", "--listen", "127.0.0.1:0", "--state-dir", str(root / "state"), *run],
                           root / "coordinator.log", stdout=subprocess.PIPE)
            procs.append(coord)
            where = ["--coordinator", _read_address(coord, 300)]
        n_donors = donors if dht else 2
        for i in range(n_donors):
            procs.append(_spawn(["node", *where, "--workdir", str(root / f"n{i}"), "--name", f"n{i}",
                                 "--device", "cpu"], root / f"n{i}.log"))
        end = time.monotonic() + timeout_s
        while _applied(root / "n0") < warm_rounds:
            if time.monotonic() > end or any(p.poll() is not None for p in procs):
                raise TimeoutError(f"the run did not get under way (logs in {root})")
            time.sleep(0.5)
        started = time.time()
        procs.append(_spawn(["node", *where, "--workdir", str(root / "joiner"), "--name", "joiner",
                             "--device", "cpu"], root / "joiner.log"))
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
