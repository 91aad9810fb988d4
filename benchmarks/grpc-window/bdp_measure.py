"""Measure what the server option ("grpc.http2.bdp_probe", 0) (and related HTTP/2 flow-control args) cost a WAN
upload/download, and what they save in memory for uploads waiting at the upload gate.

  wan:  a real coordinator (tests/security/security_harness.Trial, run = recipe ddp, a GPT sized so one frame is
        ~13 MB), member a uploads its frame (GrpcTransport.submit, repeated uploads of the same frame to the open
        round: the coordinator reads every byte of a repeat) and downloads the committed round (raw Collect through
        the member's signing stub, bytes counted) through a TCP relay that delays every chunk by RTT/2 each way.
        A fresh client channel for every measurement (the BDP estimator starts cold: the conservative case).
  mem:  a coordinator with one upload slot (ServerLimits(upload_bytes=1, min_upload_slots=1)); a child process
        joins member a, holds the slot with an upload that sends nothing, then opens N more uploads of a that each
        send a 4 MiB first chunk and wait at the gate; the coordinator process's VmRSS before/after.

The extra server options are appended to CoordinatorServer's grpc.server(options=...) by wrapping grpc.server in
this process (nothing in coordinator/ is changed).

  (from the repository root)
  PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/grpc-window/bdp_measure.py wan --opts default,off \
      --rtts direct,0,50,100 --reps 3
  PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/grpc-window/bdp_measure.py mem --opts default,off --n 64

A one-off measurement (BENCHMARKS.md, "Admission control on uploads"), kept with its raw results (results/); it is
not a test and not part of the lowband command.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file: benchmarks/grpc-window/)
sys.path.insert(0, str(ROOT / "tests" / "security"))

import security_harness as sh  # noqa: E402
from coordinator.guard import ServerLimits  # noqa: E402
from node.identity import NodeKey  # noqa: E402
from node.proto.lowband.v1 import coordinator_pb2 as pb  # noqa: E402
from node.proto.lowband.v1 import coordinator_pb2_grpc as pb_grpc  # noqa: E402
from node.runfile import build_run_file  # noqa: E402
from node.transport.grpc_client import GrpcTransport, Identity  # noqa: E402

OPTS: dict[str, list[tuple[str, Any]]] = {
    "default": [],
    "off": [("grpc.http2.bdp_probe", 0)],
    "off+look8M": [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 8 << 20)],
    "off+look4M": [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4 << 20)],
    "off+look1M": [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1 << 20)],
    "off+look512K": [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 512 << 10)],
    "look256K": [("grpc.http2.lookahead_bytes", 256 << 10)],
    "off+look256K": [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 256 << 10)],
}
EXTRA: list[tuple[str, Any]] = []
_server = grpc.server


def _patched_server(*args: Any, **kw: Any) -> Any:
    kw["options"] = [*kw.get("options", ()), *EXTRA]
    return _server(*args, **kw)


grpc.server = _patched_server  # coordinator/server.py calls grpc.server(...) through the module

GPT = {"size": "tiny", "batch_size": 2, "block_size": 32, "eval_batches": 1, "n_layer": 4, "n_embd": 288}


def run_text(membership: dict[str, Any] | None = None, rounds: dict[str, Any] | None = None) -> str:
    return build_run_file(
        run_id="bdp", recipe="ddp", rounds=100, task_params=GPT, recipe_overrides={"H": 1},
        membership={"min_nodes": 2, "max_nodes": 4, "heartbeat_s": 2.0, "lease_s": 300.0, **(membership or {})},
        rounds_policy={"initial_wait_s": 600.0, "max_wait_s": 600.0, "eval_every": 0, **(rounds or {})})


sh.run_text = run_text


# -- the delay relay ------------------------------------------------------------------------------------------------
class Relay:
    """127.0.0.1:port → target; every chunk read is written on ``one_way_s`` later (both directions), unbounded
    buffering in between: a link of latency RTT = 2·one_way_s and (for these rates) unlimited bandwidth."""

    def __init__(self, target: str, one_way_s: float, mbit: float = 0.0) -> None:
        self.host, port = target.rsplit(":", 1)
        self.tport, self.delay = int(port), one_way_s
        self.byte_s = 8 / (mbit * 1e6) if mbit > 0 else 0.0  # seconds a byte takes on the wire (0: no limit)
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)
        self.address = f"127.0.0.1:{self.port}"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self.srv = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self.srv.sockets[0].getsockname()[1]
            ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    async def _handle(self, r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await asyncio.open_connection(self.host, self.tport)
            for w in (w1, w2):
                w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.gather(self._pipe(r1, w2), self._pipe(r2, w1), return_exceptions=True)
            for w in (w1, w2):
                w.close()
        except (asyncio.CancelledError, OSError):
            pass

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        q: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        free = [0.0]  # when the (rate-limited) link is free again: a FIFO queue in front of it, never dropping

        async def reader() -> None:
            try:
                while data := await src.read(1 << 16 if self.byte_s else 1 << 18):
                    leaves = max(loop.time(), free[0]) + len(data) * self.byte_s
                    free[0] = leaves
                    q.put_nowait((leaves + self.delay, data))
            finally:
                q.put_nowait(None)

        task = asyncio.ensure_future(reader())
        try:
            while (item := await q.get()) is not None:
                due, data = item
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()
        finally:
            task.cancel()

    def close(self) -> None:
        async def stop() -> None:
            self.srv.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            await asyncio.sleep(0.05)
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(stop(), self.loop)
        self.thread.join(5)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- wan --------------------------------------------------------------------------------------------------------------
def member_transport(t: sh.Trial, name: str, address: str) -> GrpcTransport:
    m = t.members[name]
    tr = GrpcTransport(address, rpc_timeout_s=120.0, key=m.transport.key, token=t.token)
    tr.node_id, tr.identity = m.transport.node_id, t.identity(name)
    return tr


def wan(opt: str, rtts: list[str], reps: int, root: Path, download: bool = True) -> list[dict[str, Any]]:
    EXTRA[:] = OPTS[opt]
    t = sh.Trial(root / opt, limits=ServerLimits(min_stream_bps=1e5))
    rows: list[dict[str, Any]] = []
    try:
        t.join("a")
        t.join("b")
        r = t.core.open_round
        fa, fb = t.frame("a", r), t.frame("b", r)
        print(f"[{opt}] frame {len(fa) / 1e6:.1f} MB, options {EXTRA}", flush=True)
        links: dict[str, tuple[str, Relay | None]] = {}
        for rtt in rtts:
            ms, _, mbit = rtt.partition("@")
            relay = None if rtt == "direct" else Relay(t.address, float(ms) / 2000, float(mbit or 0))
            links[rtt] = (t.address if relay is None else relay.address, relay)
        for rtt in rtts:
            times = []
            for _ in range(reps):
                tr = member_transport(t, "a", links[rtt][0])
                t0 = time.perf_counter()
                out = tr.submit(r, fa, loss=2.0)
                times.append(time.perf_counter() - t0)
                tr.close()
                assert out == "accepted", out
            rows.append(dict(opt=opt, rtt=rtt, dir="upload", bytes=len(fa), times=times))
            print(f"[{opt}] upload   rtt={rtt:>6} {fmt(len(fa), times)}", flush=True)
        assert t.members["b"].transport.submit(r, fb, loss=2.0) == "accepted"
        for rtt in rtts if download else ():
            times, nbytes = [], 0
            for _ in range(reps):
                tr = member_transport(t, "a", links[rtt][0])
                t0 = time.perf_counter()
                stream = tr.stub.Collect(pb.CollectRequest(node_id=tr.node_id, round=r, wait_ms=20000,
                                                           submitted=True), timeout=300)
                nbytes = sum(len(c.piece.data) for c in stream if c.WhichOneof("part") == "piece")
                times.append(time.perf_counter() - t0)
                tr.close()
            rows.append(dict(opt=opt, rtt=rtt, dir="download", bytes=nbytes, times=times))
            print(f"[{opt}] download rtt={rtt:>6} {fmt(nbytes, times)}", flush=True)
        for _, relay in links.values():
            if relay is not None:
                relay.close()
    finally:
        t.close()
    return rows


def fmt(nbytes: int, times: list[float]) -> str:
    med = statistics.median(times)
    return (f"{nbytes / 1e6:6.1f} MB  median {med:6.2f} s  {nbytes * 8 / med / 1e6:7.1f} Mbit/s  "
            f"(runs {', '.join(f'{x:.2f}' for x in times)})")


# -- mem --------------------------------------------------------------------------------------------------------------
def mem(opt: str, n: int, root: Path, chunks: int = 1) -> dict[str, Any]:
    EXTRA[:] = OPTS[opt]
    limits = ServerLimits(upload_bytes=1, min_upload_slots=1, upload_wait_s=120.0, idle_stream_s=120.0,
                          per_member_rpcs=n + 8, per_peer_rpcs=n + 32)
    t = sh.Trial(root / f"mem-{opt}", limits=limits)
    try:
        spec = root / f"mem-{opt}.json"
        i = t.info
        spec.write_text(json.dumps(dict(address=t.address, token=t.token, n=n, round=t.core.open_round, chunks=chunks,
                                        identity=[i.config_json, i.config_hash, i.task_fingerprint, i.model_digest])))
        time.sleep(1.0)
        before = rss_mib()
        child = subprocess.Popen([sys.executable, __file__, "memclient", str(spec)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        try:
            line = child.stdout.readline()  # "ready" once every stream is open and has sent its chunk
            assert line.startswith("ready"), line
            peak = before
            for _ in range(10):  # what gRPC buffers settles within a few hundred ms on loopback
                time.sleep(0.3)
                peak = max(peak, rss_mib())
            after = rss_mib()
            waiting = t.server.uploads.peak_waiting
        finally:
            child.stdin.close()
            child.wait(60)
        res = dict(opt=opt, n=n, sent_mib=4 * chunks, before=before, after=after, peak=peak, peak_waiting=waiting,
                   per_stream_kib=(peak - before) * 1024 / n)
        print(f"[{opt}] mem n={n} x {4 * chunks} MiB sent: RSS {before:.0f} -> {peak:.0f} MiB (+{peak - before:.0f} MiB, "
              f"{res['per_stream_kib']:.0f} KiB/stream; {waiting} waited at the gate)", flush=True)
        return res
    finally:
        t.close()


def memclient(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    tr = GrpcTransport(spec["address"], rpc_timeout_s=30.0, token=spec["token"])
    tr.identity = Identity("a", *spec["identity"], ("device=cpu",), spec["token"])
    tr.join()
    ch = grpc.insecure_channel(spec["address"], options=[("grpc.max_send_message_length", 16 << 20)])
    stub = pb_grpc.CoordinatorStub(ch)
    r, k = spec["round"], spec["chunks"]
    total = (4 << 20) * k + 1  # one byte more than is sent: every stream stays incomplete
    idle = sh.Idle()
    calls = [stub.Submit.future(iter(idle), metadata=sh.signed_metadata(tr.key, tr.node_id, "Submit",
                                                                        submit=(r, total)), timeout=120)]
    time.sleep(0.5)  # the idle upload holds the one slot
    data = os.urandom(4 << 20)
    for _ in range(spec["n"]):
        chunks = [pb.SubmitChunk(node_id=tr.node_id, round=r, offset=i << 22, total_size=total, data=data)
                  for i in range(k)]
        calls.append(stub.Submit.future(iter(chunks), metadata=sh.signed_metadata(
            tr.key, tr.node_id, "Submit", submit=(r, total)), timeout=120))
    time.sleep(3.0)
    print("ready", flush=True)
    sys.stdin.read()
    idle.release()
    for c in calls:
        c.cancel()
    ch.close()
    tr.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["wan", "mem", "memclient"])
    ap.add_argument("spec", nargs="?")
    ap.add_argument("--opts", default="default,off")
    ap.add_argument("--rtts", default="direct,0,50,100",
                    help="links: direct, or RTT in ms through the relay, optionally @Mbit/s (e.g. 200@50)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--json", default="")
    ap.add_argument("--mem-chunks", type=int, default=1, help="mem: 4 MiB chunks each waiting upload sends")
    ap.add_argument("--no-download", action="store_true", help="uploads only (the server's options set the upload's "
                    "receive window; the download's is the client's)")
    ap.add_argument("--chunk-kib", type=int, default=0, help="the client's Submit chunk (default: grpc_client.CHUNK)")
    a = ap.parse_args()
    if a.chunk_kib:
        import node.transport.grpc_client as gc

        gc.CHUNK = a.chunk_kib << 10
        print(f"client chunk {gc.CHUNK >> 10} KiB", flush=True)
    if a.mode == "memclient":
        memclient(a.spec)
        return
    out: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="bdp-") as tmp:
        for opt in a.opts.split(","):
            if a.mode == "wan":
                out += wan(opt, a.rtts.split(","), a.reps, Path(tmp), not a.no_download)
            else:
                out.append(mem(opt, a.n, Path(tmp), a.mem_chunks))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
