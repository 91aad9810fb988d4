"""The coordinator's HTTP side on a real socket (127.0.0.1, port 0), against a status and round history of our
making: what it serves, the read token, hostile requests (bounded query strings, nothing reflected, GET only), the
exposure rule, and HTTPS with the coordinator's certificate."""
from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from coordinator.errors import StartupError, Unauthorized
from coordinator.metrics import CoordinatorCollector, Refusals, RoundHistory, coordinator_registry
from coordinator.startup import ServerTls, check_http_exposure
from coordinator.web import SECURITY_HEADERS, Dashboard, WebServer, bind_socket
from node.certs import CertificateAuthority
from node.roundlog import RoundRow

TOKEN = "rt-secret-123"


def _status() -> dict[str, Any]:
    return {"run_id": "web-test", "recipe": "sign", "current_round": 3, "committed_rounds": 3, "deadline_in_s": 2.5,
            "members": [], "recent": [], "reference_fingerprint": "ab" * 8, "submitted": ["n0"], "now": 10.0,
            "persistence_error": ""}


def _status_json() -> dict[str, Any]:
    return {"run_id": "web-test", "current_round": 3, "members": [{"name": "<b>n0</b>", "bytes_in": 12}]}


def _check(token: str) -> None:
    if token != TOKEN:
        raise Unauthorized("needs the read token")


def _history(state: Path) -> RoundHistory:
    state.mkdir(parents=True, exist_ok=True)
    lines = [RoundRow(r, 100.0 + 2 * r, ["n0", "n1"], "all submitted", "f" * 16, 1000, 1000, 0.5, 3.0 - r / 10,
                      float("nan"), "all_submitted").to_json() for r in range(5)]
    lines += [json.dumps({"round": r, "val_loss": 2.5 - r / 10}) for r in (1, 3)]
    (state / "rounds.jsonl").write_text("\n".join(lines) + "\n")
    return RoundHistory(state)


def _serve(tmp_path: Path, tls: ServerTls | None = None) -> tuple[WebServer, str]:
    history = _history(tmp_path / "state")
    registry = coordinator_registry(CoordinatorCollector(history, _status, Refusals(), 4000, 10))
    web = WebServer(Dashboard(_status_json, history, registry, _check, 10), tls)
    sock = bind_socket("127.0.0.1", 0, "the dashboard")
    web.add(sock, pages=True)
    web.start()
    return web, f"{web.scheme}://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def site(tmp_path: Path) -> Iterator[str]:
    web, base = _serve(tmp_path)
    try:
        yield base
    finally:
        web.stop()


def get(url: str, token: str | None = None, method: str = "GET",
        context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_the_page_and_its_assets_need_no_token_and_carry_a_strict_policy(site: str) -> None:
    code, headers, body = get(site + "/")
    assert code == 200 and b"/static/dashboard.js" in body
    for name, value in SECURITY_HEADERS.items():
        assert headers[name] == value
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    for asset, kind in (("dashboard.js", "text/javascript"), ("uPlot.iife.min.js", "text/javascript"),
                        ("uPlot.min.css", "text/css"), ("dashboard.css", "text/css")):
        code, headers, body = get(f"{site}/static/{asset}")
        assert code == 200 and headers["Content-Type"].startswith(kind) and body
    assert get(site + "/static/..%2Fweb.py")[0] == 404
    assert get(site + "/static/index.html")[0] == 404  # only the listed files


def test_data_needs_the_read_token(site: str) -> None:
    for path in ("/api/status", "/api/rounds", "/metrics"):
        code, headers, body = get(site + path)
        assert code == 401, path
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert get(site + path, token="wrong")[0] == 401
        assert get(site + path, token=TOKEN)[0] == 200
    status = json.loads(get(site + "/api/status", token=TOKEN)[2])
    assert status["run_id"] == "web-test" and status["rounds_total"] == 10
    assert status["members"][0]["name"] == "<b>n0</b>"  # data as data: the page writes it as text


def test_the_round_series_is_the_history_bounded(site: str) -> None:
    series = json.loads(get(site + "/api/rounds", token=TOKEN)[2])
    assert series["round"] == [0, 1, 2, 3, 4]
    assert series["val_loss"] == [None, 2.4, None, 2.2, None]
    assert series["cumulative_bytes"] == [2000, 4000, 6000, 8000, 10000]
    assert series["period_s"][0] is None and series["period_s"][1:] == [2.0, 2.0, 2.0, 2.0]
    thin = json.loads(get(site + "/api/rounds?since=1&points=2", token=TOKEN)[2])
    assert thin["round"] == [1, 4]  # thinned, the last one kept


@pytest.mark.parametrize("query", ["since=abc", "since=-1", "points=1", "points=99999", "since=1e3",
                                   "since=" + "9" * 12])
def test_bad_query_parameters_are_refused_without_echo(site: str, query: str) -> None:
    code, _, body = get(f"{site}/api/rounds?{query}", token=TOKEN)
    assert code == 400
    assert json.loads(body) == {"error": "since: an integer 0..1000000000; points: an integer 2..2000"}


def test_hostile_requests_get_fixed_answers(site: str) -> None:
    code, _, body = get(site + "/api/rounds?" + "a" * 200, token=TOKEN)
    assert code == 414 and b"aaaa" not in body
    code, _, body = get(site + "/%3Cscript%3Ealert(1)%3C/script%3E")
    assert code == 404 and b"script" not in body
    assert get(site + "/", method="POST")[0] == 405
    assert get(site + "/api/status", token=TOKEN, method="DELETE")[0] == 405


def test_off_loopback_without_tls_is_refused() -> None:
    with pytest.raises(StartupError, match="refusing to serve the dashboard on 0.0.0.0 without TLS"):
        check_http_exposure("0.0.0.0", None, False, "the dashboard")
    check_http_exposure("0.0.0.0", None, True, "the dashboard")  # --insecure
    check_http_exposure("127.0.0.1", None, False, "the dashboard")


def test_a_busy_port_is_one_line() -> None:
    first = bind_socket("127.0.0.1", 0, "the dashboard")
    try:
        with pytest.raises(StartupError, match=r"cannot serve the dashboard on 127\.0\.0\.1:\d+"):
            bind_socket("127.0.0.1", first.getsockname()[1], "the dashboard")
    finally:
        first.close()


def test_https_with_the_coordinators_certificate(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "pki")
    cert, key = tmp_path / "pki" / "server.pem", tmp_path / "pki" / "server.key"
    ca.issue_server(["127.0.0.1"], cert, key)
    web, base = _serve(tmp_path, ServerTls(cert.read_bytes(), key.read_bytes()))
    try:
        assert base.startswith("https://")
        context = ssl.create_default_context(cafile=str(ca.path))
        code, _, body = get(base + "/api/status", token=TOKEN, context=context)
        assert code == 200 and json.loads(body)["run_id"] == "web-test"
        with pytest.raises(urllib.error.URLError):  # a client that does not trust the CA gets nothing
            get(base + "/api/status", token=TOKEN, context=ssl.create_default_context())
    finally:
        web.stop()
