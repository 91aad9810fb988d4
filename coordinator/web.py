"""The coordinator's HTTP side (aiohttp, on a thread and event loop of its own): a read-only live dashboard
(``--http-port``) and the Prometheus metrics (``/metrics``, also alone on ``--metrics-port``).

Exposure follows the gRPC port's rules (coordinator/startup.py, ``check_exposure``): off loopback it is served over
TLS with the coordinator's certificate, or refused unless ``--insecure``. Client certificates are not asked for (a
browser has none); what the page shows is the ``Status`` view, so every data endpoint takes the same read token as
``Status`` (the run's read or join token, open when it has neither) as ``Authorization: Bearer TOKEN``. The page
itself, its script and the vendored plotting library (uPlot, MIT, ``web_static/vendor``) carry no data and need none.

Every request is hostile: only GET/HEAD on a fixed set of routes, no request body, query strings bounded (two
integer parameters), no input reflected in any answer, a strict Content-Security-Policy (scripts and styles from
this origin only), and status snapshots cached briefly so that many clients cost the core one lock per period.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from coordinator.errors import CoordinatorError, StartupError
from coordinator.metrics import RoundHistory
from coordinator.startup import ServerTls

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("web_static")
FILES = {  # URL name → (file under web_static, content type)
    "dashboard.js": ("dashboard.js", "text/javascript"),
    "dashboard.css": ("dashboard.css", "text/css"),
    "uPlot.iife.min.js": ("vendor/uPlot.iife.min.js", "text/javascript"),
    "uPlot.min.css": ("vendor/uPlot.min.css", "text/css"),
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
}
MAX_QUERY = 64  # characters of a query string
MAX_POINTS = 2000  # per plotted series
SNAPSHOT_S = 0.5  # a status snapshot is reused this long


def _json_number(x: float) -> float | None:
    return None if x is None or math.isnan(x) or math.isinf(x) else round(float(x), 6)


def _error(status: int, message: str, **headers: str) -> web.Response:
    """A fixed message: never anything taken from the request."""
    return web.json_response({"error": message}, status=status, headers=headers)


class Dashboard:
    """What the HTTP endpoints read: the run's status view (``status()``: the ``Status`` JSON), the round history, the metrics registry, and ``check_read(token)`` (raises a CoordinatorError when the token
    does not read this run)."""

    def __init__(self, status: Callable[[], dict[str, Any]], history: RoundHistory, registry: CollectorRegistry,
                 check_read: Callable[[str], None], rounds_total: int) -> None:
        self._status, self.history, self.registry = status, history, registry
        self.check_read, self.rounds_total = check_read, rounds_total
        self._snapshot: tuple[float, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def status_json(self) -> dict[str, Any]:
        """The run's ``Status`` view as JSON (node/status.py ``status_json``), plus ``rounds_total``. Called off the
        event loop: it takes the core's lock; reused for ``SNAPSHOT_S``."""
        with self._lock:
            now = time.monotonic()
            if self._snapshot is None or now - self._snapshot[0] >= SNAPSHOT_S:
                self._snapshot = (now, {**self._status(), "rounds_total": self.rounds_total})
            return self._snapshot[1]

    def rounds_json(self, since: int, points: int) -> dict[str, Any]:
        self.history.refresh()
        rows = self.history.series(since, points)
        return {"round": [p.round for p in rows], "cumulative_bytes": [p.cumulative_bytes for p in rows],
                "val_loss": [_json_number(p.val_loss) for p in rows],
                "train_loss": [_json_number(p.mean_loss) for p in rows],
                "period_s": [_json_number(p.period_s) for p in rows],
                "spread_s": [_json_number(p.spread_s) for p in rows],
                "bytes_in": [p.bytes_in for p in rows], "bytes_out": [p.bytes_out for p in rows]}


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or len(raw) > 9:
        return None
    value = int(raw)
    return value if low <= value <= high else None


def build_app(dashboard: Dashboard, *, pages: bool = True) -> web.Application:
    """The routes: with ``pages`` the dashboard (page, static files, JSON API) and /metrics; else /metrics alone."""

    @web.middleware
    async def harden(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        if len(request.query_string) > MAX_QUERY:
            response: web.StreamResponse = _error(414, "query string too long")
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:  # 404/405 from the router: a fixed text
                response = _error(exc.status, exc.reason)
        response.headers.update(SECURITY_HEADERS)
        return response

    async def off_loop(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def authorized(request: web.Request) -> web.Response | None:
        try:
            await off_loop(dashboard.check_read, _bearer(request))
        except CoordinatorError:
            return _error(401, "this run needs its read token (or join token): Authorization: Bearer TOKEN",
                          **{"WWW-Authenticate": 'Bearer realm="lowband"', "Cache-Control": "no-store"})
        return None

    async def metrics(request: web.Request) -> web.Response:
        denied = await authorized(request)
        if denied is not None:
            return denied
        body = await off_loop(generate_latest, dashboard.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"})

    async def status(request: web.Request) -> web.Response:
        denied = await authorized(request)
        if denied is not None:
            return denied
        return web.json_response(await off_loop(dashboard.status_json), headers={"Cache-Control": "no-store"})

    async def rounds(request: web.Request) -> web.Response:
        denied = await authorized(request)
        if denied is not None:
            return denied
        since = _int_param(request, "since", 0, 0, 10**9)
        points = _int_param(request, "points", 500, 2, MAX_POINTS)
        if since is None or points is None:
            return _error(400, f"since: an integer 0..1000000000; points: an integer 2..{MAX_POINTS}")
        return web.json_response(await off_loop(dashboard.rounds_json, since, points),
                                 headers={"Cache-Control": "no-store"})

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=(STATIC / "index.html").read_bytes(), content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def static(request: web.Request) -> web.Response:
        entry = FILES.get(request.match_info["name"])
        if entry is None:
            return _error(404, "not found")
        path, kind = entry
        return web.Response(body=(STATIC / path).read_bytes(), content_type=kind, headers={"Cache-Control": "no-cache"})

    app = web.Application(middlewares=[harden], client_max_size=1024)
    app.router.add_get("/metrics", metrics)
    if pages:
        app.router.add_get("/", page)
        app.router.add_get("/static/{name}", static)
        app.router.add_get("/api/status", status)
        app.router.add_get("/api/rounds", rounds)
    return app


def bind_socket(host: str, port: int, what: str) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one); StartupError naming ``what`` when it cannot."""
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bare or "0.0.0.0", port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot serve {what} on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def ssl_context(tls: ServerTls) -> ssl.SSLContext:
    """A server context with the coordinator's certificate and key (PEM bytes, loaded through a private temp dir:
    ``ssl`` reads files only)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    tmp = tempfile.mkdtemp(prefix="lowband-tls-")
    try:
        cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((cert, tls.cert), (key, tls.key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert, key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ctx


class WebServer:
    """The HTTP sites of one coordinator on a thread of their own. ``add(sock, pages)`` before ``start``."""

    def __init__(self, dashboard: Dashboard, tls: ServerTls | None) -> None:
        self.dashboard = dashboard
        self._ssl = ssl_context(tls) if tls is not None else None
        self._sites: list[tuple[socket.socket, bool]] = []
        self._loop = asyncio.new_event_loop()
        self._runners: list[web.AppRunner] = []
        self._thread = threading.Thread(target=self._loop.run_forever, name="http", daemon=True)
        self.scheme = "https" if self._ssl is not None else "http"

    def add(self, sock: socket.socket, pages: bool) -> None:
        self._sites.append((sock, pages))

    async def _start(self) -> None:
        for sock, pages in self._sites:
            runner = web.AppRunner(build_app(self.dashboard, pages=pages), access_log=None, handle_signals=False)
            await runner.setup()
            await web.SockSite(runner, sock, ssl_context=self._ssl).start()
            self._runners.append(runner)

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)

    async def _stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()

    def stop(self) -> None:
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
            except Exception as exc:  # noqa: BLE001 — shutting down: log and go on
                log.warning("http server did not stop cleanly: %s", exc)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()
        for sock, _ in self._sites:
            sock.close()


def url(scheme: str, host: str, port: int, path: str = "/") -> str:
    shown = host if host not in ("", "0.0.0.0", "::", "[::]") else "127.0.0.1"
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"{scheme}://{shown}:{port}{path}"

