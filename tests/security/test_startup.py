"""``lowband coordinator`` start-up errors are one clear line on stderr and exit 2 (no traceback): a state dir in use
by another coordinator, an unusable state dir, a busy port, listening off loopback without TLS. ``lowband certs``
makes what a TLS deployment needs. Real processes; every wait bounded."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.errors import StartupError
from coordinator.server import CoordinatorServer
from node.identity import KEY_FILE
from security_harness import run_text

START_S = 120.0


def lowband(*args: str, timeout: float = START_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def one_line(out: subprocess.CompletedProcess[str], starts: str) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert "Traceback" not in out.stderr and lines == [lines[-1]] and lines[-1].startswith(starts), out.stderr
    return lines[-1]


@pytest.fixture
def run_file(tmp_path: Path) -> Path:
    p = tmp_path / "run.toml"
    p.write_text(run_text())
    return p


def test_start_up_errors_are_one_line_and_exit_2(tmp_path: Path, run_file: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    line = one_line(lowband("-q", "coordinator", "--listen", "127.0.0.1:0", "--state-dir", str(blocker / "state"),
                            "--run", str(run_file)), "lowband coordinator: cannot start: cannot use state dir")
    assert "Not a directory" in line
    line = one_line(lowband("-q", "coordinator", "--listen", "0.0.0.0:0", "--state-dir", str(tmp_path / "s1"),
                            "--run", str(run_file)), "lowband coordinator: cannot start: refusing to listen on 0.0.0.0")
    assert "--tls-cert and --tls-key" in line and "--insecure" in line
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_line(lowband("-q", "coordinator", "--listen", f"127.0.0.1:{port}", "--state-dir",
                                str(tmp_path / "s2"), "--run", str(run_file)),
                        f"lowband coordinator: cannot start: cannot listen on 127.0.0.1:{port}")
        assert "Address already in use" in line


def test_a_second_coordinator_process_on_a_state_dir_in_use_is_refused(tmp_path: Path, run_file: Path) -> None:
    state = tmp_path / "state"
    first = subprocess.Popen([sys.executable, "-m", "node.cli", "-q", "coordinator", "--listen", "127.0.0.1:0",
                              "--state-dir", str(state), "--run", str(run_file)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert first.stdout is not None
        line = first.stdout.readline()  # blocks until it listens (or exits: then the assert names it)
        assert line.startswith("lowband coordinator listening on 127.0.0.1:"), line
        second = lowband("-q", "coordinator", "--listen", "127.0.0.1:0", "--state-dir", str(state), "--run",
                         str(run_file))
        one_line(second, f"lowband coordinator: cannot start: state dir {state} is in use by another coordinator "
                         f"(pid {first.pid})")
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        assert first.wait(timeout=60) == 0


def test_a_web_port_that_cannot_be_bound_closes_the_ones_bound_before_it(tmp_path: Path, run_file: Path) -> None:
    state = tmp_path / "state"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(StartupError, match=rf"cannot serve the metrics on 127\.0\.0\.1:{port}"):
            CoordinatorServer("127.0.0.1:0", state, run_file, http="127.0.0.1:0", metrics=f"127.0.0.1:{port}")
    http_port = json.loads((state / "listen.json").read_text())["http_port"]  # bound before the metrics' failed
    with socket.socket() as again:  # closed: free to bind at once (no SO_REUSEADDR on our side)
        again.bind(("127.0.0.1", http_port))
    server = CoordinatorServer("127.0.0.1:0", state, run_file, http="127.0.0.1:0")  # and the state dir is free
    server.stop(grace=0)


def test_lowband_certs_makes_a_ca_a_server_certificate_and_node_certificates(tmp_path: Path) -> None:
    out = lowband("certs", "--dir", str(tmp_path / "pki"), "--host", "127.0.0.1", "--host", "coord.example.org",
                  "--node", str(tmp_path / "n0"), "--node", str(tmp_path / "n1"))
    assert out.returncode == 0, out.stderr
    for f in ("pki/ca.pem", "pki/ca.key", "pki/server.pem", "pki/server.key", f"n0/{KEY_FILE}", "n0/tls.pem",
              "n0/tls.key", "n1/tls.pem"):
        assert (tmp_path / f).exists(), f
    for f in ("pki/ca.key", "pki/server.key", f"n0/{KEY_FILE}", "n0/tls.key"):
        assert (tmp_path / f).stat().st_mode & 0o077 == 0, f
    ca_before = (tmp_path / "pki/ca.pem").read_bytes()
    key_before = (tmp_path / f"n0/{KEY_FILE}").read_bytes()
    again = lowband("certs", "--dir", str(tmp_path / "pki"), "--node", str(tmp_path / "n0"))
    assert again.returncode == 0 and (tmp_path / "pki/ca.pem").read_bytes() == ca_before  # the CA is reused
    assert (tmp_path / f"n0/{KEY_FILE}").read_bytes() == key_before  # and so is the node's identity
