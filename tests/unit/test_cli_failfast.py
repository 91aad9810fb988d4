"""The command line as a new user meets it, each case a real ``lowband`` process: what exits at once, with which
status, and the one line it prints (docs/operations.md, "Exit statuses")."""
from __future__ import annotations

import socket
import subprocess
import sys
from concurrent import futures
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from node.certs import CertificateAuthority

from node.runfile import build_run_file

CLI = [sys.executable, "-m", "node.cli"]


def lowband(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL)


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    return lines[0]


@pytest.mark.parametrize("address, says", [
    ("127.0.0.1", "no port; give HOST:PORT"),  # gRPC would dial port 443
    ("http://127.0.0.1:7070", "without a scheme"),
    ("grpc://coordinator:7070", "without a scheme"),
    ("127.0.0.1:abc", "the port must be a number 1..65535, got 'abc'"),
    ("127.0.0.1:70000", "the port must be a number"),
    ("::1", "an IPv6 address needs brackets"),
    (":7070", "no host"),
])
def test_a_malformed_coordinator_address_exits_2_at_once(tmp_path: Path, address: str, says: str) -> None:
    out = lowband("node", "--coordinator", address, "--workdir", str(tmp_path / "w"))
    assert out.returncode == 2
    line = one_line(out)
    assert line.startswith("lowband node: configuration error: --coordinator") and says in line
    out = lowband("status", "--coordinator", address)
    assert out.returncode == 2 and says in one_line(out)


def test_status_of_an_unreachable_coordinator_exits_5_with_one_line() -> None:
    """Not 1 (a bug, the exit table says): the coordinator did not answer."""
    with socket.socket() as held:  # bound, never listening: connections to it are refused
        held.bind(("127.0.0.1", 0))
        out = lowband("status", "--coordinator", f"127.0.0.1:{held.getsockname()[1]}")
    assert out.returncode == 5 and "UNAVAILABLE" in one_line(out)


def test_an_unreachable_coordinator_counts_down_then_gives_up_with_5(tmp_path: Path) -> None:
    with socket.socket() as held:  # bound, never listening: connections to it are refused, and no one can take it
        held.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{held.getsockname()[1]}"
        out = lowband("node", "--coordinator", address, "--workdir", str(tmp_path / "w"), "--connect-timeout", "2")
    assert out.returncode == 5
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and "resuming at byte" not in out.stderr
    countdown = [line for line in lines if "not reachable" in line]
    assert countdown and all(f"coordinator {address} not reachable" in line and "giving up in" in line
                             for line in countdown)
    assert lines[-1].startswith(f"lowband node: giving up: coordinator {address} unreachable for 2s")
    assert "--connect-timeout" in lines[-1]


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """Two CAs made by ``lowband certs``: ca1 issued the coordinator's certificate (for 127.0.0.1, and one more for
    another host), ca2 did not."""
    assert lowband("certs", "--dir", str(tmp_path / "ca1"), "--host", "127.0.0.1").returncode == 0
    assert lowband("certs", "--dir", str(tmp_path / "ca2")).returncode == 0
    CertificateAuthority.load_or_create(tmp_path / "ca1").issue_server(["coordinator.example.org"],
                                                                       tmp_path / "other.pem", tmp_path / "other.key")
    return tmp_path


def _server(cert: Path | None, key: Path | None) -> Iterator[str]:
    """A gRPC server on 127.0.0.1, port 0 (TLS with ``cert``, plaintext without), serving no method: a client that
    gets through TLS is answered UNIMPLEMENTED."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    address = "127.0.0.1:0"
    port = (server.add_secure_port(address, grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
            if cert is not None and key is not None else server.add_insecure_port(address))
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


@pytest.mark.parametrize("served, ca, says", [
    ("ca1/server", "ca2", "its TLS certificate does not verify against --tls-ca {ca} (unable to get local issuer "
                          "certificate): give --tls-ca the CA that issued it"),
    ("other", "ca1", "its TLS certificate does not name '127.0.0.1': dial it by a name the certificate holds, give "
                     "--tls-server-name NAME"),
    (None, "ca1", "does not speak TLS"),
])
def test_a_tls_problem_with_the_coordinator_exits_2_at_once_naming_it(pki: Path, served: str | None, ca: str,
                                                                       says: str) -> None:
    """A wrong CA, a certificate for another host, a plaintext coordinator: no retry fixes them, so a node is not
    left counting down to --connect-timeout as if the coordinator were away."""
    cert, key = (pki / f"{served}.pem", pki / f"{served}.key") if served else (None, None)
    ca_path = str(pki / ca / "ca.pem")
    for address in _server(cert, key):
        node = lowband("node", "--coordinator", address, "--workdir", str(pki / "w"), "--tls-ca", ca_path,
                       "--connect-timeout", "600")
        status = lowband("status", "--coordinator", address, "--tls-ca", ca_path)
        trusted = lowband("status", "--coordinator", address, "--tls-ca", str(pki / "ca1" / "ca.pem"))
    assert node.returncode == 2, node.stderr
    line = one_line(node)
    assert line.startswith(f"lowband node: configuration error: coordinator {address}"), line
    assert says.format(ca=ca_path) in line, line
    assert "not reachable" not in node.stderr  # failed at the first try
    assert status.returncode == 2, status.stderr
    assert says.format(ca=ca_path) in one_line(status)
    if served == "ca1/server":  # the CA that issued it gets through TLS (then: no such method on this server)
        assert trusted.returncode == 4 and "UNIMPLEMENTED" in one_line(trusted), trusted.stderr


def test_demo_arguments_out_of_range_exit_2_with_one_line() -> None:
    out = lowband("demo", "--H", "-3")
    assert out.returncode == 2
    assert one_line(out) == "lowband demo: error: argument --H: expected an integer ≥ 1, got -3 (see lowband demo --help)"
    out = lowband("demo", "--nodes", "0")
    assert out.returncode == 2 and "--nodes" in one_line(out)


def test_demo_with_a_recipe_a_coordinator_cannot_serve_exits_2_naming_the_alternative(tmp_path: Path) -> None:
    out = lowband("demo", "--recipe", "dct", "--workdir", str(tmp_path / "demo"))
    assert out.returncode == 2
    line = one_line(out)
    assert line.startswith("lowband demo: configuration error: recipe 'dct'") and "'dct-consistent'" in line
    assert not (tmp_path / "demo").exists()  # refused before anything started


def test_an_unknown_command_or_option_is_one_line() -> None:
    out = lowband("coordinatr")
    assert out.returncode == 2 and "invalid choice: 'coordinatr'" in one_line(out)
    out = lowband("status", "--coordinator", "h:1", "--jsn")
    assert out.returncode == 2 and "unrecognized arguments: --jsn" in one_line(out)


def _run_file(tmp_path: Path, **sections: dict) -> Path:
    """A run file; ``task`` replaces its [task] table, other sections are appended as written (typos included)."""
    text = build_run_file(run_id="cli-errors", recipe="sign", rounds=3, task_params=sections.pop("task", {"size": "tiny"}))
    for name, values in sections.items():
        body = "\n".join(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v!r}" for k, v in values.items())
        text += f"\n[{name}]\n{body}\n"
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("sections, says", [
    ({"membership": {"min_node": 2}}, "unknown [membership] key 'min_node'; valid keys: heartbeat_s, idle_rounds, "
                                      "idle_s, join_token, lease_s, max_nodes, min_nodes, read_token"),
    ({"rounds": {"max_wiat_s": 9.0}}, "unknown [rounds] key 'max_wiat_s'; valid keys: aggregate_codec, eval_every, "
                                      "history, initial_wait_s"),
    ({"membership": {"min_nodes": "two"}}, "[membership] min_nodes must be int, got 'two'"),
    ({"task": {"sise": "tiny"}}, "unknown [task] key 'sise'; valid keys: batch_size, block_size, eval_batches"),
    ({"task": {"size": "huge"}}, "size must be one of ['gpt2', 'medium', 'small', 'tiny'], got 'huge'; valid keys:"),
    ({"extra": {"x": 1}}, "unknown section [extra]; valid sections: [run], [task], [recipe], [membership], [rounds], [dht], [authority]"),
])
def test_every_run_file_error_is_one_line_naming_the_key_and_exit_2(tmp_path: Path, sections: dict, says: str) -> None:
    out = lowband("coordinator", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
                  "--run", str(_run_file(tmp_path, **sections)))
    assert out.returncode == 2, out.stderr
    line = one_line(out)
    assert line.startswith("lowband coordinator: configuration error:") and says in line, line


def test_the_dashboard_off_loopback_without_tls_is_refused_before_anything_loads(tmp_path: Path) -> None:
    out = lowband("coordinator", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
                  "--run", str(_run_file(tmp_path)), "--http-host", "0.0.0.0", "--http-port", "0")
    assert out.returncode == 2
    assert one_line(out).startswith("lowband coordinator: cannot start: refusing to serve the dashboard on 0.0.0.0 "
                                    "without TLS")
