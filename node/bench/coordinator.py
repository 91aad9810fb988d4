"""``lowband bench coordinator``: round latency and coordinator overhead on loopback.

A real coordinator process serves a run; N client threads play the nodes with precomputed frames
(no training), so a round's latency is pure protocol + validation + outer step + persistence +
transfer. Overhead = latency − transfer time, where transfer time is the round's bytes through the
coordinator divided by the loopback gRPC throughput measured in the same session (a FetchState of the
model's state). ``tls``: the coordinator serves TLS with a certificate from a throwaway CA (node/certs.py) and the
clients check it, as off loopback; every call is signed by the client's node key either way.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from node import wire
from node.bench.fake_nodes import encoded_updates, protocol_run_file
from node.bench.procs import read_coordinator_address, spawn_lowband, stop_group
from node.runfile import parse_run_file
from node.tasks import load_task
from node.train.reference import model_digest
from node.transport.grpc_client import GrpcTransport, Identity
from node.progress import progress_iter

log = logging.getLogger(__name__)

def run_coordinator_bench(nodes_list: list[int], rounds: int, recipe: str = "sign", size: str = "tiny",
                          out: Path | None = None, tls: bool = False) -> list[dict[str, Any]]:
    from node.certs import CertificateAuthority
    from node.transport.grpc_auth import ClientTls

    text = protocol_run_file(recipe, size)
    cfg = parse_run_file(text).run
    task = load_task(cfg.task.name, **cfg.task.params)
    results = []
    for n in progress_iter(nodes_list, "bench coordinator", unit="settings"):
        root = Path(tempfile.mkdtemp(prefix="lowband-bench-coord-"))
        (root / "run.toml").write_text(text)
        tls_args, client_tls = [], None
        if tls:
            ca = CertificateAuthority.load_or_create(root / "pki")
            ca.issue_server(["127.0.0.1"], root / "pki" / "server.pem", root / "pki" / "server.key")
            tls_args = ["--tls-cert", str(root / "pki" / "server.pem"), "--tls-key", str(root / "pki" / "server.key")]
            client_tls = ClientTls(ca.path.read_bytes())
        proc = spawn_lowband(["-q", "coordinator", "--listen", "127.0.0.1:0", "--state-dir", str(root / "state"),
                              "--run", str(root / "run.toml"), *tls_args], root / "coordinator.log",
                             stdout=subprocess.PIPE)
        try:
            address = read_coordinator_address(proc, 120)
            names = [f"b{i:02d}" for i in range(n)]
            codec, spec, updates, params = encoded_updates(cfg, task, names)
            digest = model_digest(spec)
            clients = []
            for name in names:
                t = GrpcTransport(address, tls=client_tls)
                t.identity = Identity(name, json.dumps(cfg.to_dict()), cfg.config_hash(task.fingerprint),
                                      task.fingerprint, digest)
                t.join()
                clients.append(t)
            latencies, bytes_moved = [], []
            for r in range(rounds + 1):  # round 0 warms up
                frames = {name: wire.pack(cfg.run_id, r, name, codec, spec, updates[name]) for name in names}
                barrier = threading.Barrier(n + 1)
                done: list[float] = []
                moved: list[int] = []

                def play(t: GrpcTransport, name: str) -> None:
                    barrier.wait()
                    res = t.exchange(r, frames[name], 120.0, 0.0, name)
                    assert res.committed, res.reason
                    moved.append(res.bytes_sent + res.bytes_received)
                    done.append(time.perf_counter())

                threads = [threading.Thread(target=play, args=(t, name)) for t, name in zip(clients, names)]
                for th in threads:
                    th.start()
                barrier.wait()
                start = time.perf_counter()
                for th in threads:
                    th.join()
                if r > 0:
                    latencies.append(max(done) - start)
                    bytes_moved.append(sum(moved))
            t0 = time.perf_counter()
            blob = clients[0].fetch_state().blob
            fetch_s = time.perf_counter() - t0
            throughput = len(blob) / fetch_s
            for t in clients:
                t.leave()
                t.close()
            med = statistics.median(latencies)
            transfer = statistics.median(bytes_moved) / throughput
            row = {"nodes": n, "tls": tls, "recipe": recipe, "size": size, "params": params, "rounds": rounds,
                   "frame_bytes": len(next(iter(frames.values()))), "bytes_per_round": statistics.median(bytes_moved),
                   "latency_median_s": med, "latency_p90_s": sorted(latencies)[int(0.9 * (len(latencies) - 1))],
                   "loopback_Bps": throughput, "transfer_s": transfer, "overhead_s": med - transfer}
            results.append(row)
            log.info("%d nodes: median round %.3f s, transfer %.3f s, overhead %.3f s", n, med, transfer, med - transfer)
        finally:
            stop_group(proc)
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} cores; recipe {recipe}, gpt {size}, "
             f"{'TLS' if tls else 'plaintext'} (calls signed by node keys)", "",
             "| nodes | params | frame bytes | bytes/round | median round s | p90 s | transfer s | overhead s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['nodes']} | {r['params']:,} | {r['frame_bytes']:,} | {int(r['bytes_per_round']):,} | "
                     f"{r['latency_median_s']:.3f} | {r['latency_p90_s']:.3f} | {r['transfer_s']:.3f} | "
                     f"{r['overhead_s']:.3f} |")
    print("\n".join(lines))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "coordinator.json").write_text(json.dumps(results, indent=2))
    return results
