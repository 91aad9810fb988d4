"""Shared pieces of the DhtTransport tests: peers in one process, each with its own hivemind DHT + p2pd on
127.0.0.1 (port 0, NAT traversal off)."""
from __future__ import annotations

import contextlib
import subprocess
import threading
from typing import Any, Iterator

from node.train.worker import Worker
from node.transport.messages import RoundResult
from node.transport.dht import DhtTransport

NAMES = ("w0", "w1", "w2")
ROUND_WAIT_S = 2.0
NET: dict[str, Any] = {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "nat_port_map": False, "auto_nat": False,
                       "use_relay": False}
TASK_PARAMS: dict[str, Any] = {"size": "tiny", "batch_size": 2, "block_size": 32, "eval_batches": 2}


def p2pd_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "p2pd"], capture_output=True, text=True, timeout=10).stdout
    return {int(p) for p in out.split()}


def workers(setup: tuple[Any, Any]) -> list[Worker]:
    cfg, task = setup
    return [Worker(n, cfg, task, shard=i, num_shards=len(NAMES)) for i, n in enumerate(NAMES)]


@contextlib.contextmanager
def peers(run_id: str) -> Iterator[list[DhtTransport]]:
    """Three transports: the first starts the DHT, the others bootstrap from its visible addresses."""
    made: list[DhtTransport] = []
    try:
        made.append(DhtTransport.create(run_id, NAMES[0], round_wait_s=ROUND_WAIT_S, **NET))
        boot = made[0].visible_maddrs()
        for name in NAMES[1:]:
            made.append(DhtTransport.create(run_id, name, boot, round_wait_s=ROUND_WAIT_S, **NET))
        for t in made:
            t.join()
        yield made
    finally:
        for t in made:
            t.close()


def collect_all(ts: list[DhtTransport], round_: int, timeout_s: float = 30.0) -> dict[str, RoundResult]:
    """collect() on every peer at once, as separate nodes would; joins are bounded."""
    results: dict[str, RoundResult] = {}
    threads = [threading.Thread(target=lambda t=t: results.__setitem__(t.name, t.collect(round_, timeout_s)))
               for t in ts]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout_s + 30)
    assert not any(th.is_alive() for th in threads), "a collect() did not return in time"
    assert set(results) == {t.name for t in ts}
    return results
