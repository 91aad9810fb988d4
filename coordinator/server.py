"""``lowband coordinator``: build the core, serve gRPC (+ standard health checking), tick deadlines."""
from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from node.runfile import load_run_file
from coordinator.core import CoordinatorCore
from coordinator.servicer import CoordinatorServicer
from coordinator.store import Store
from node.proto.lowband.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
MAX_MESSAGE = 8 << 20
SERVICE_NAME = "lowband.v1.Coordinator"


class CoordinatorServer:
    def __init__(self, listen: str, state_dir: str | Path, run_file: str | Path, tick_s: float = 0.2) -> None:
        cfg = load_run_file(run_file)
        self.store = Store(state_dir)
        self.core = CoordinatorCore(cfg, self.store)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.membership.max_nodes * 3 + 8),
                                  options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                           ("grpc.max_send_message_length", MAX_MESSAGE)])
        pb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(self.core), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {listen}")
        self.address = f"{listen.rsplit(':', 1)[0]}:{self.port}"
        self._stop = threading.Event()
        self._tick_s = tick_s
        self._ticker = threading.Thread(target=self._tick_loop, name="ticker", daemon=True)

    def _tick_loop(self) -> None:
        while not self._stop.wait(self._tick_s):
            try:
                self.core.tick()
            except Exception:  # a bug in one tick must not stop lease expiry for good
                log.exception("tick failed")

    def start(self) -> None:
        self.server.start()
        self._ticker.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float = 2.0) -> None:
        self._stop.set()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace).wait()
        self.core.close()
        self.store.close()


def serve(listen: str, state_dir: str, run_file: str) -> int:
    server = CoordinatorServer(listen, state_dir, run_file)
    server.start()
    # The bound address goes to stdout on its own line so scripts can read it (``--listen HOST:0``).
    print(f"lowband coordinator listening on {server.address}", flush=True)
    log.info("run %s recipe %s, state in %s, committed rounds %d", server.core.cfg.run.run_id,
             server.core.cfg.run.recipe.name, state_dir, server.core.reference.committed_rounds)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    log.info("shutting down")
    server.stop()
    return 0
