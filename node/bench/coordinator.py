"""``lowband bench coordinator``: round latency and coordinator overhead on loopback.

A real coordinator process serves a run; N client threads play the nodes with precomputed frames
(no training), so a round's latency is pure protocol + validation + outer step + persistence +
transfer. Overhead = latency − transfer time, where transfer time is the round's bytes through the
coordinator divided by the loopback gRPC throughput measured in the same session (a FetchState of the
model's state). ``tls``: the coordinator serves TLS with a certificate from a throwaway CA (node/certs.py) and the
clients check it, as off loopback; every call is signed by the client's node key either way. ``result``: relay (every
member gets every payload) or aggregate (the coordinator reduces and sends one dense frame). The coordinator's torch
threads are set explicitly (``--torch-threads``, default 1), and the run admits as many members as the largest node
count. All state lives under one temporary directory, removed at the end (also on error or Ctrl-C) unless ``keep``.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
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
from node.config import RunConfig
from node.runfile import parse_run_file
from node.tasks import load_task
from node.tasks.base import Task
from node.train.reference import model_digest
from node.transport.grpc_client import GrpcTransport, Identity
from node.progress import progress_iter

log = logging.getLogger(__name__)

def bench_max_nodes(nodes_list: list[int], max_nodes: int | None = None) -> int:
    """The run file's ``membership.max_nodes`` for a bench over ``nodes_list``: ``max_nodes`` when given, else the
    largest node count (the coordinator sizes its RPC workers by it, so a bound far above the bench's largest N
    would measure a bigger server than needed). Raises ValueError when ``max_nodes`` admits fewer than that."""
    largest = max(nodes_list)
    if max_nodes is None:
        return largest
    if max_nodes < largest:
        raise ValueError(f"max_nodes {max_nodes} is below the largest node count {largest}")
    return max_nodes


def run_coordinator_bench(nodes_list: list[int], rounds: int, recipe: str = "sign", size: str = "tiny",
                          out: Path | None = None, tls: bool = False, *, result: str = "relay",
                          aggregate_codec: str = "identity", torch_threads: int = 1, max_nodes: int | None = None,
                          keep: bool = False) -> list[dict[str, Any]]:
    """Round latency, transfer and overhead per node count (module docstring); prints a table, writes
    ``coordinator.json`` to ``out``. ``result``/``aggregate_codec``: the run's ``[rounds]`` result mode;
    ``torch_threads``: the coordinator's ``--torch-threads``; ``max_nodes``: see ``bench_max_nodes``. Every state
    directory is made under one temporary directory, removed at the end, on error and on Ctrl-C alike, unless ``keep``
    (its path is logged). Raises ValueError for a ``max_nodes`` below the largest node count."""
    text = protocol_run_file(recipe, size, max_nodes=bench_max_nodes(nodes_list, max_nodes), result=result,
                             aggregate_codec=aggregate_codec)
    cfg = parse_run_file(text).run
    task = load_task(cfg.task.name, **cfg.task.params)
    top = Path(tempfile.mkdtemp(prefix="lowband-bench-coord-"))
    results = []
    try:
        for n in progress_iter(nodes_list, "bench coordinator", unit="settings"):
            root = top / f"nodes-{n}"
            root.mkdir()
            (root / "run.toml").write_text(text)
            row = _measure(root, cfg, task, n, rounds, tls, torch_threads)
            row.update(recipe=recipe, size=size, result=result,
                       aggregate_codec=aggregate_codec if result == "aggregate" else None)
            results.append(row)
            log.info("%d nodes: median round %.3f s, transfer %.3f s, overhead %.3f s", n, row["latency_median_s"],
                     row["transfer_s"], row["overhead_s"])
    finally:
        if keep:
            log.info("kept the bench's state directories in %s", top)
        else:
            shutil.rmtree(top, ignore_errors=True)
    mode = result if result == "relay" else f"aggregate ({aggregate_codec})"
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} cores; recipe {recipe}, gpt {size}, result {mode}, "
             f"coordinator torch threads {torch_threads}, "
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


def _measure(root: Path, cfg: RunConfig, task: Task, n: int, rounds: int, tls: bool,
             torch_threads: int) -> dict[str, Any]:
    """One node count: a coordinator process on ``root``'s run file and state, ``n`` client threads, ``rounds``
    measured rounds after one warm-up. The coordinator is stopped and every client closed however this ends."""
    from node.certs import CertificateAuthority
    from node.transport.grpc_auth import ClientTls

    tls_args, client_tls = [], None
    if tls:
        ca = CertificateAuthority.load_or_create(root / "pki")
        ca.issue_server(["127.0.0.1"], root / "pki" / "server.pem", root / "pki" / "server.key")
        tls_args = ["--tls-cert", str(root / "pki" / "server.pem"), "--tls-key", str(root / "pki" / "server.key")]
        client_tls = ClientTls(ca.path.read_bytes())
    proc = spawn_lowband(["-q", "coordinator", "--listen", "127.0.0.1:0", "--state-dir", str(root / "state"),
                          "--run", str(root / "run.toml"), "--torch-threads", str(torch_threads), *tls_args],
                         root / "coordinator.log", stdout=subprocess.PIPE)
    clients: list[GrpcTransport] = []
    try:
        address = read_coordinator_address(proc, 120)
        names = [f"b{i:02d}" for i in range(n)]
        codec, spec, updates, params = encoded_updates(cfg, task, names)
        digest = model_digest(spec)
        for name in names:
            t = GrpcTransport(address, tls=client_tls)
            clients.append(t)
            t.identity = Identity(name, json.dumps(cfg.to_dict()), cfg.config_hash(task.fingerprint),
                                  task.fingerprint, digest)
            t.join()
        latencies, bytes_moved = [], []
        frames: dict[str, bytes] = {}
        for r in range(rounds + 1):  # round 0 warms up
            # signed by each client's node key: a coordinator verifies every frame against its sender's key
            frames = {name: wire.pack(cfg.run_id, r, name, codec, spec, updates[name], key=t.key)
                      for t, name in zip(clients, names)}
            barrier = threading.Barrier(n + 1)
            done: list[float] = []
            moved: list[int] = []

            def play(t: GrpcTransport, name: str) -> None:
                barrier.wait()
                res = t.exchange(r, frames[name], 120.0, 0.0, name)
                assert res.committed, res.reason
                moved.append(res.bytes_sent + res.bytes_received)
                done.append(time.perf_counter())

            threads = [threading.Thread(target=play, args=(t, name), daemon=True) for t, name in zip(clients, names)]
            for th in threads:
                th.start()
            barrier.wait()
            start = time.perf_counter()
            for th in threads:
                th.join()
            if len(done) < n:
                raise RuntimeError(f"round {r}: {n - len(done)} of {n} clients did not commit (their errors above; "
                                   "--keep keeps the coordinator's log)")
            if r > 0:
                latencies.append(max(done) - start)
                bytes_moved.append(sum(moved))
        t0 = time.perf_counter()
        blob = clients[0].fetch_state().blob
        throughput = len(blob) / (time.perf_counter() - t0)
        for t in clients:
            t.leave()
    finally:
        for t in clients:
            t.close()
        stop_group(proc)
    med = statistics.median(latencies)
    transfer = statistics.median(bytes_moved) / throughput
    return {"nodes": n, "tls": tls, "params": params, "rounds": rounds, "torch_threads": torch_threads,
            "frame_bytes": len(next(iter(frames.values()))), "bytes_per_round": statistics.median(bytes_moved),
            "latency_median_s": med, "latency_p90_s": sorted(latencies)[int(0.9 * (len(latencies) - 1))],
            "loopback_Bps": throughput, "transfer_s": transfer, "overhead_s": med - transfer}
