"""The serverless load generator: N simulated DHT peers (precomputed frames, no training) in real processes on
loopback, several peers per process, playing rounds; per-peer bytes up and down, round latency, CPU and memory.

Every peer is a real ``DhtTransport`` with its own hivemind DHT process and p2pd (127.0.0.1, NAT traversal off);
``peers_per_process`` of them share one host process (a ``spawn``ed Python process holding their precomputed
frames). A round: every host packs its peers' frames for the round (outside the timed window), then on the
parent's "go" every peer submits and collects at once; the round's latency is from "go" to the last peer's
``collect`` returning (``time.monotonic``, one clock for every process on the machine).

What is counted, exactly: the application bytes of the round's streams — whole frames, slices and shard aggregates
— as each peer received them (``RoundResult.bytes_received``) and served them (``FramePool.served``, read once
every peer finished the round). DHT records (announcements, have-lists, outcomes, shard records: a few hundred bytes
each) and libp2p's own framing are not. CPU is user + system time of every process of the bench (hosts, DHT
processes, p2pd) over the round; memory is the sum of their proportional resident sets (Pss), sampled after every
round.

``lowband bench scale --dht`` calls ``run_dht_scale`` (node/cli_bench.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from node.bench.fake_nodes import protocol_run_file
from node.bench.proctable import descendants, process_table

log = logging.getLogger(__name__)
NET: dict[str, Any] = {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "nat_port_map": False, "auto_nat": False,
                       "use_relay": False}
TIMEOUT_S = 600.0  # the most one round may take on a busy machine before the bench gives up


def _host(conn: Any, names: list[str], run_text: str, boot: list[str], shard_above: int | None,
          log_path: str) -> None:
    """One host process: its peers, their precomputed updates, and the parent's commands over ``conn``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from node import wire
    from node.bench.fake_nodes import encoded_updates
    from node.runfile import parse_run_file
    from node.tasks import load_task
    from node.transport.dht import DhtTransport

    # after hivemind's import, which installs its own handler on the root logger
    logging.basicConfig(filename=log_path, level=logging.INFO,
                        format="%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s", force=True)
    logging.getLogger("node.transport.dht_sharded").setLevel(logging.DEBUG)
    torch.set_num_threads(1)
    cfg = parse_run_file(run_text).run
    task = load_task(cfg.task.name, **cfg.task.params)
    codec, spec, updates, params = encoded_updates(cfg, task, names)
    peers: list[DhtTransport] = []
    try:
        for name in names:
            start = boot or (peers[0].visible_maddrs() if peers else [])
            peers.append(DhtTransport.create(cfg.run_id, name, start, round_wait_s=TIMEOUT_S, fetch_timeout_s=120.0,
                                             heartbeat_s=2.0, rpc_timeout_s=60.0, settle_s=5.0,
                                             shard_above=shard_above, owner_wait_s=60.0, **NET))
        for p in peers:
            p.join()
        conn.send(("ready", peers[0].visible_maddrs(), params))
        frames: dict[str, bytes] = {}
        while True:
            cmd, r = conn.recv()
            if cmd == "close":
                break
            if cmd == "pack":
                frames = {n: wire.pack(cfg.run_id, r, n, codec, spec, updates[n]) for n in names}
                conn.send(("packed", len(frames[names[0]])))
            elif cmd == "go":
                conn.send(("done", _play(peers, frames, r)))
            elif cmd == "served":
                conn.send(("served", {p.name: p.frames.served.get(r, 0) for p in peers}))
    finally:
        for p in peers:
            p.close()


def _play(peers: list[Any], frames: dict[str, bytes], r: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}

    def one(p: Any) -> None:
        p.submit(r, frames[p.name])
        res = p.collect(r, TIMEOUT_S)
        out[p.name] = {"committed": res.committed, "members": len(res.members), "reason": res.reason,
                       "received": res.bytes_received, "done": time.monotonic(),
                       "result": _digest(res.aggregate if res.aggregate is not None else b"".join(res.payloads.values())),
                       "sharded": res.aggregate is not None}

    threads = [threading.Thread(target=one, args=(p,)) for p in peers]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return out


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()  # the same on every host (``hash`` is salted per process)


def _tree_usage(root: int) -> tuple[float, int]:
    """(CPU seconds, proportional resident bytes) of ``root`` and every process under it, now: the DHT processes are
    forks of their host, so plain RSS would count the pages they share once per process."""
    table = process_table()
    cpu, rss = 0.0, 0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in descendants(root, table) | {root}:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            with open(f"/proc/{pid}/smaps_rollup") as f:  # Pss: a page shared by k processes counts 1/k
                rss += next(int(line.split()[1]) for line in f if line.startswith("Pss:")) * 1024
        except (OSError, ValueError, IndexError, StopIteration):
            continue
        cpu += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return cpu, rss


def dht_scale(n: int, size: str, rounds: int, logs: Path, *, recipe: str = "sign", shard_above: int | None = 8,
              peers_per_process: int = 8) -> dict[str, Any]:
    """One setting: ``n`` peers, ``rounds`` measured rounds after a warm-up round. Raises RuntimeError when a round
    does not commit identically on every peer."""
    ctx = mp.get_context("spawn")
    run_text = protocol_run_file(recipe, size, run_id=f"bench-scale-dht-{n}")
    names = [f"p{i:03d}" for i in range(n)]
    groups = [names[i:i + peers_per_process] for i in range(0, n, peers_per_process)]
    hosts: list[tuple[Any, Any]] = []
    try:
        boot: list[str] = []
        for i, group in enumerate(groups):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_host, args=(child, group, run_text, boot, shard_above,
                                                   str(logs / f"host{i}.log")))  # not daemonic: it forks DHTs
            proc.start()
            hosts.append((proc, parent))
            if i == 0:  # the others bootstrap from the first host's first peer
                _, boot, params = _expect(hosts[0], "ready")
        for h in hosts[1:]:
            _expect(h, "ready")
        latencies, cpus, ups, downs, peak = [], [], [], [], 0
        frame_bytes = 0
        for r in range(rounds + 1):  # round 0 warms the connections up
            for _, conn in hosts:
                conn.send(("pack", r))
            frame_bytes = max(_expect(h, "packed")[1] for h in hosts)
            cpu0, _ = _tree_usage(os.getpid())
            t0 = time.monotonic()
            for _, conn in hosts:
                conn.send(("go", r))
            results: dict[str, dict[str, Any]] = {}
            for h in hosts:
                results.update(_expect(h, "done")[1])
            cpu1, rss = _tree_usage(os.getpid())
            served: dict[str, int] = {}
            for _, conn in hosts:
                conn.send(("served", r))
            for h in hosts:
                served.update(_expect(h, "served")[1])
            bad = {p: v["reason"] for p, v in results.items() if not v["committed"] or v["members"] != n}
            if bad or len({v["result"] for v in results.values()}) != 1:
                raise RuntimeError(f"{n} peers, round {r}: not committed alike: {dict(list(bad.items())[:4])}")
            log.info("dht scale %d peers round %d: %.2f s", n, r, max(v["done"] for v in results.values()) - t0)
            peak = max(peak, rss)
            if r > 0:
                latencies.append(max(v["done"] for v in results.values()) - t0)
                cpus.append(cpu1 - cpu0)
                ups.append([served[p] for p in names])
                downs.append([results[p]["received"] for p in names])
        up = [statistics.mean(u) for u in ups]
        down = [statistics.mean(d) for d in downs]
        return {"peers": n, "mode": "sharded" if results[names[0]]["sharded"] else "all-gather", "recipe": recipe,
                "size": size, "params": params, "payload_bytes": frame_bytes, "rounds": rounds,
                "peers_per_process": peers_per_process,
                "bytes_up_per_peer_round": statistics.median(up),
                "bytes_up_max_peer_round": max(max(u) for u in ups),
                "bytes_down_per_peer_round": statistics.median(down),
                "bytes_down_max_peer_round": max(max(d) for d in downs),
                "round_latency_s": {"median": statistics.median(latencies),
                                    "p90": statistics.quantiles(latencies, n=10, method="inclusive")[-1]
                                    if len(latencies) > 1 else latencies[0]},
                "round_latencies_s": latencies,
                "cpu_s_per_round": statistics.median(cpus), "peak_rss_bytes": peak}
    finally:
        for proc, conn in hosts:
            try:
                conn.send(("close", 0))
            except OSError:
                pass
        for proc, _ in hosts:
            proc.join(60)
            if proc.is_alive():
                proc.terminate()
                proc.join(10)


def _expect(host: tuple[Any, Any], what: str) -> tuple[Any, ...]:
    proc, conn = host
    while not conn.poll(5.0):
        if not proc.is_alive():
            raise RuntimeError(f"a host process died (exit code {proc.exitcode}) before '{what}'")
    msg = conn.recv()
    if msg[0] != what:
        raise RuntimeError(f"a host answered {msg[0]!r}, expected {what!r}")
    return msg


def run_dht_scale(peers: list[int], size: str, rounds: int, out: Path, keep: bool, *, recipe: str = "sign",
                  shard_above: int | None = 8, peers_per_process: int = 8) -> list[dict[str, Any]]:
    """One row per peer count (fields: module doc and ``dht_scale``), written to ``out/scale_dht.json`` as they
    come. ``keep``: keep the host processes' logs under ``out/logs`` (else a temporary directory, removed);
    ``shard_above``: None for the all-gather at every N."""
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lowband-scale-dht-") as tmp:
        logs = out / "logs" if keep else Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        for n in peers:
            row = dht_scale(n, size, rounds, logs, recipe=recipe, shard_above=shard_above,
                            peers_per_process=peers_per_process)
            row["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
            rows.append(row)
            (out / "scale_dht.json").write_text(json.dumps(rows, indent=2))
            print(json.dumps(row), flush=True)
    return rows
