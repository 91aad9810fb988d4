"""``lowband bench exchange``: how long one round's exchange takes in serverless (DHT) mode for N peers, next
to coordinator mode on the same machine.

DHT mode: N ``DhtTransport`` peers in this process, each with its own hivemind DHT process and p2pd on
127.0.0.1; every peer holds a precomputed frame (a random update encoded by the recipe's codec for the chosen
model — no training). All peers submit at once (a barrier); a round's time is from then until the last peer's
``collect`` returns with all N frames agreed. This is an all-gather: every peer pulls the N−1 other frames, so a
peer moves (N−1)·frame bytes in and out. "bytes moved/round" counts in + out over the whole group in both modes:
2·N·(N−1)·frame for the DHT, N·frame up + N·(N−1)·frame down for the coordinator (a relay).

Coordinator mode: ``bench coordinator`` (a coordinator process, N client threads), whose round latency also
includes the coordinator's validation, reduce, outer step and its fsync'd state write.

Both modes run every process on the same cores, so at large N the figure is dominated by CPU contention
(N p2pd daemons on 2 cores), not by the protocol: it is a comparison on one machine, not a WAN prediction.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from node import wire
from node.bench.coordinator import run_coordinator_bench
from node.bench.fake_nodes import encoded_updates, protocol_run_file
from node.runfile import parse_run_file
from node.tasks import load_task
from node.progress import progress_iter

log = logging.getLogger(__name__)
NET: dict[str, Any] = {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "nat_port_map": False, "auto_nat": False,
                       "use_relay": False}


def dht_exchange(n: int, rounds: int, recipe: str, size: str) -> dict[str, Any]:
    from node.transport.dht import DhtTransport

    cfg = parse_run_file(protocol_run_file(recipe, size)).run
    task = load_task(cfg.task.name, **cfg.task.params)
    names = [f"p{i:02d}" for i in range(n)]
    codec, spec, updates, params = encoded_updates(cfg, task, names)
    peers: list[DhtTransport] = []
    try:
        started = time.perf_counter()
        for name in names:
            boot = peers[0].visible_maddrs() if peers else []
            peers.append(DhtTransport.create(cfg.run_id, name, boot, round_wait_s=120.0, fetch_timeout_s=300.0,
                                             heartbeat_s=2.0, rpc_timeout_s=30.0, **NET))
        for p in peers:
            p.join()
        log.info("%d DHT peers up in %.1f s", n, time.perf_counter() - started)
        times, moved = [], []
        for r in range(rounds + 1):  # round 0 warms the connections up
            frames = {name: wire.pack(cfg.run_id, r, name, codec, spec, updates[name]) for name in names}
            barrier = threading.Barrier(n + 1)
            done: list[float] = []
            traffic: list[int] = []

            def play(p: DhtTransport) -> None:
                barrier.wait()
                p.submit(r, frames[p.name])
                res = p.collect(r, 600.0)
                if not res.committed or len(res.members) != n:
                    raise RuntimeError(f"{p.name} round {r}: {res.reason} ({len(res.members)} members)")
                traffic.append(res.bytes_received)
                done.append(time.perf_counter())

            threads = [threading.Thread(target=play, args=(p,)) for p in peers]
            for th in threads:
                th.start()
            barrier.wait()
            t0 = time.perf_counter()
            for th in threads:
                th.join()
            if len(done) != n:
                raise RuntimeError(f"round {r}: only {len(done)}/{n} peers completed")
            if r > 0:
                times.append(max(done) - t0)
                moved.append(sum(traffic))
            log.info("dht %s %d peers round %d: %.3f s", recipe, n, r, max(done) - t0)
        frame_bytes = len(next(iter(frames.values())))
        return {"mode": "dht", "peers": n, "recipe": recipe, "size": size, "params": params,
                # every byte a peer received, another peer served: in + out over the group
                "frame_bytes": frame_bytes, "bytes_per_round": 2 * statistics.median(moved),
                "round_median_s": statistics.median(times), "round_max_s": max(times), "rounds": rounds}
    finally:
        for p in peers:
            p.close()


def run_exchange_bench(peers_list: list[int], recipes: list[str], size: str, rounds: int, modes: list[str],
                       out: Path | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for recipe, n in progress_iter([(r, n) for r in recipes for n in peers_list], "bench exchange", unit="settings"):
        if "dht" in modes:
            rows.append(dht_exchange(n, rounds, recipe, size))
        if "coordinator" in modes:
            row = run_coordinator_bench([n], rounds, recipe=recipe, size=size)[0]
            rows.append({"mode": "coordinator", "peers": n, "recipe": recipe, "size": size,
                         "params": row["params"], "frame_bytes": row["frame_bytes"],
                         "bytes_per_round": row["bytes_per_round"], "round_median_s": row["latency_median_s"],
                         "round_max_s": row["latency_p90_s"], "rounds": rounds,
                         "coordinator_overhead_s": row["overhead_s"]})
        if out is not None:  # keep what is measured so far: a long sweep may be stopped
            out.mkdir(parents=True, exist_ok=True)
            (out / "exchange.json").write_text(json.dumps(rows, indent=2))
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} cores; gpt {size}", "",
             "| recipe | peers | mode | frame bytes | bytes moved/round | median round s | max s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['peers']} | {r['mode']} | {r['frame_bytes']:,} | "
                     f"{int(r['bytes_per_round']):,} | {r['round_median_s']:.3f} | {r['round_max_s']:.3f} |")
    print("\n".join(lines))
    return rows
