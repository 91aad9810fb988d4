"""``lowband coordinator``: build the core, serve gRPC (+ standard health checking), tick deadlines.

Start-up (coordinator/startup.py) locks the state dir, checks the exposure (TLS off loopback, or --insecure), sets
up the join token, and binds the port (the remembered one for ``HOST:0``); any failure is a ``StartupError``:
``lowband coordinator`` prints its one line and exits 2. Every call passes the guard (coordinator/guard.py) before
the servicer; the server's threads are sized so every bound of ``ServerLimits`` can be full at once, and gRPC
refuses calls beyond that at once (``maximum_concurrent_rpcs``) instead of queueing them. Health is NOT_SERVING
while the store cannot persist rounds.

With ``http`` (``--http-port``) the coordinator also serves its dashboard, and with ``metrics`` (``--metrics-port``)
Prometheus metrics (coordinator/web.py, coordinator/metrics.py), under the same exposure rules and port memory.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import sqlite3
import threading
from concurrent import futures
from pathlib import Path
from typing import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator.core import CoordinatorCore
from coordinator.errors import StartupError
from coordinator.guard import RpcGuard, ServerLimits
from coordinator.metrics import CoordinatorCollector, Refusals, RoundHistory, coordinator_registry
from coordinator.servicer import CoordinatorServicer, status_response
from coordinator.startup import (ServerTls, StateDirLock, check_exposure, check_http_exposure, check_port_free,
                                 ensure_join_token, pick_port, remember_port, return_freed_memory_to_the_system)
from coordinator.store import Disk, Store
from coordinator.upload_gate import UploadGate
from coordinator.watchdog import Watchdog
from coordinator.web import Dashboard, WebServer, bind_socket, url
from node.clock import SYSTEM_CLOCK, Clock
from node.proto.lowband.v1 import coordinator_pb2_grpc as pb_grpc
from node.runfile import load_run_file
from node.status import status_json
from node.transport.grpc_auth import is_loopback, split_address

log = logging.getLogger(__name__)
MAX_MESSAGE = 8 << 20
SERVICE_NAME = "lowband.v1.Coordinator"


class CoordinatorServer:
    """One coordinator. ``tls``: TLS settings (None: plaintext, refused off loopback unless ``insecure``);
    ``limits``: resource bounds; ``disk``: the store's writer (tests inject faults); ``watchdog_clock``: what
    server-side deadlines are measured on (tests drive it by hand with ``start_watchdog=False``)."""

    def __init__(self, listen: str, state_dir: str | Path, run_file: str | Path, tick_s: float = 0.2, *,
                 tls: ServerTls | None = None, insecure: bool = False, limits: ServerLimits | None = None,
                 disk: Disk | None = None, watchdog_clock: Clock = SYSTEM_CLOCK, start_watchdog: bool = True,
                 join_token: str = "", http: str | None = None, metrics: str | None = None,
                 forget_names: Sequence[str] = ()) -> None:
        cfg = load_run_file(run_file)
        if join_token:  # --join-token / $LOWBAND_JOIN_TOKEN: the run file's own, for deployments that inject it
            cfg = dataclasses.replace(cfg, membership=dataclasses.replace(cfg.membership, join_token=join_token))
        host, port = split_address(listen)
        check_exposure(host, tls, insecure)
        for address, what in ((http, "the dashboard"), (metrics, "the metrics")):
            if address:  # refused before anything is loaded: the same rule as the gRPC port's
                check_http_exposure(split_address(address)[0], tls, insecure, what)
        self.state_dir = Path(state_dir)
        self.lock = StateDirLock(self.state_dir)
        return_freed_memory_to_the_system()  # the seeded model and each round's aggregate are freed, not kept
        self.limits = limits or ServerLimits()
        self._stop = threading.Event()
        self.store: Store | None = None
        self.core: CoordinatorCore | None = None
        self.watchdog: Watchdog | None = None
        self.web: WebServer | None = None
        self.urls: dict[str, str] = {}
        try:
            # port 0: the port it had before, so its nodes find a restarted coordinator where it was
            port, why = pick_port(self.state_dir, port, "port", "the coordinator")
            if why:
                log.info("listening on the port it had before%s", why)
            if port:
                check_port_free(host, port, why)
            cfg, self.generated_token = ensure_join_token(cfg, self.state_dir, is_loopback(host))
            try:
                self.store = Store(self.state_dir, disk=disk)
                freed, kept = self.store.forget_names(forget_names)  # an operator's decision (coordinator/names.py)
                for name in freed:
                    log.warning("name %r freed: the next key to join under it holds it", name)
                for name in kept:
                    log.warning("name %r not freed: its key was evicted (it would be refused again)", name)
            except (OSError, sqlite3.Error) as exc:
                raise StartupError(f"cannot use state dir {self.state_dir}: {exc}") from None
            try:
                self.core = CoordinatorCore(cfg, self.store, skew_s=self.limits.skew_s)
            except (OSError, sqlite3.Error) as exc:
                raise StartupError(f"cannot use state dir {self.state_dir}: {exc}") from None
            self.watchdog = Watchdog(watchdog_clock, start=start_watchdog)
            slots = self.limits.upload_slots(self.core.limit)
            self.uploads = UploadGate(slots, self.limits.upload_wait_s) if slots is not None else None
            self.guard = RpcGuard(self.core.member_key, self.limits, self.watchdog,
                                  mtls=tls is not None and tls.client_ca is not None, uploads=self.uploads)
            workers = self.limits.workers(cfg.membership.max_nodes)
            self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), interceptors=[self.guard],
                                      maximum_concurrent_rpcs=workers,
                                      options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                               ("grpc.max_send_message_length", MAX_MESSAGE),
                                               ("grpc.so_reuseport", 0), *self.limits.stream_options()])
            self.refusals = Refusals()
            pb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(self.core, self.guard.mtls, self.refusals),
                                                      self.server)
            self.health = health.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
            if http or metrics:
                self._web(http, metrics, tls, insecure)
            # bound last: gRPC keeps an unstarted server's port until the process ends, so nothing may fail after it
            self.port = self._bind(host, port, tls, why)
            remember_port(self.state_dir, self.port)
            self.address = f"{host}:{self.port}"
            self.tls = tls
            self._tick_s = tick_s
            self._ticker = threading.Thread(target=self._tick_loop, name="ticker", daemon=True)
        except BaseException:
            self._release()
            raise

    def _bind(self, host: str, port: int, tls: ServerTls | None, why: str) -> int:
        address = f"{host}:{port}"
        try:
            bound = (self.server.add_secure_port(address, tls.credentials()) if tls is not None
                     else self.server.add_insecure_port(address))
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise StartupError(f"cannot listen on {address}{why}: address in use or not available here")
        return bound

    def _web(self, http: str | None, metrics: str | None, tls: ServerTls | None, insecure: bool) -> None:
        """Bind the dashboard's and the metrics' ports (checked like the gRPC port's); served from ``start``."""
        core = self.core
        assert core is not None
        run = core.cfg.run
        dense = core.reference.dense_bytes()  # one member's Δ as dense fp32
        history = RoundHistory(self.state_dir)
        registry = coordinator_registry(CoordinatorCollector(history, core.status, self.refusals, dense, run.rounds))
        # held at once: a port that cannot be bound below still has the ones bound before it closed by _release
        self.web = web = WebServer(Dashboard(lambda: status_json(status_response(core)), history, registry,
                                             core.check_read, run.rounds), tls)
        for address, key, what, pages in ((http, "http_port", "the dashboard", True),
                                          (metrics, "metrics_port", "the metrics", False)):
            if not address:
                continue
            host, port = split_address(address)
            if not pages and http and port and split_address(http) == (host, port):
                self.urls["metrics"] = self.urls["http"] + "metrics"  # the dashboard's port serves /metrics too
                continue
            port, why = pick_port(self.state_dir, port, key, what)
            sock = bind_socket(host, port, what + why)
            bound = sock.getsockname()[1]
            web.add(sock, pages)
            remember_port(self.state_dir, bound, key)
            self.urls["http" if pages else "metrics"] = url(web.scheme, host, bound, "/" if pages else "/metrics")

    def _tick_loop(self) -> None:
        serving = True
        while not self._stop.wait(self._tick_s):
            try:
                self.core.tick()  # type: ignore[union-attr]
            except Exception:  # a bug in one tick must not stop lease expiry for good
                log.exception("tick failed")
            ok = self.core.persistence.ok  # type: ignore[union-attr]
            if ok != serving:
                serving = ok
                self._set_health(ok)

    def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def start(self) -> None:
        self.server.start()
        self._ticker.start()
        self._set_health(True)
        if self.web is not None:
            self.web.start()

    def stop(self, grace: float = 2.0) -> None:
        self._stop.set()
        self._set_health(False)
        if self.web is not None:
            self.web.stop()
        self.server.stop(grace).wait()
        if self._ticker.is_alive():
            self._ticker.join(timeout=5)
        self._release()

    def _release(self) -> None:
        if self.web is not None:
            self.web.stop()
            self.web = None
        if self.watchdog is not None:
            self.watchdog.close()
        if self.core is not None:
            self.core.close()
        if self.store is not None:
            self.store.close()
        self.lock.release()


def serve(listen: str, state_dir: str, run_file: str, *, tls: ServerTls | None = None, insecure: bool = False,
          limits: ServerLimits | None = None, join_token: str = "", http: str | None = None,
          metrics: str | None = None, forget_names: Sequence[str] = ()) -> int:
    """Run until SIGTERM/SIGINT; raises StartupError (one line for the operator) when it cannot start."""
    server = CoordinatorServer(listen, state_dir, run_file, tls=tls, insecure=insecure, limits=limits,
                               join_token=join_token, http=http, metrics=metrics, forget_names=forget_names)
    server.start()
    core = server.core
    assert core is not None
    # The bound address goes to stdout on its own line so scripts can read it (``--listen HOST:0``). The port is
    # remembered in the state dir: the same command with port 0 binds it again after a restart.
    print(f"lowband coordinator listening on {server.address}", flush=True)
    for kind, shown in sorted(server.urls.items()):
        print(f"lowband coordinator {'dashboard' if kind == 'http' else 'metrics'} on {shown}", flush=True)
    if server.generated_token:
        print(f"lowband coordinator join token: {server.generated_token}", flush=True)
        log.warning("this run listens off loopback and its run file has no join token: nodes need the one generated "
                    "in %s/join_token (printed above): --join-token or $LOWBAND_JOIN_TOKEN", state_dir)
    log.info("run %s recipe %s, state in %s, committed rounds %d, %s%s", core.cfg.run.run_id,
             core.cfg.run.recipe.name, state_dir, core.reference.committed_rounds,
             "TLS" if tls is not None else "plaintext (no TLS)",
             ", mutual TLS (client certificates name node keys)" if tls is not None and tls.client_ca else "")
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    log.info("shutting down")
    server.stop()
    return 0
