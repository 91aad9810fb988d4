"""Helpers for the multi-process integration tests: a coordinator and nodes as real processes on 127.0.0.1.

Every process is started in its own session (so in its own process group) and stopped through that group
only; the ``cluster`` fixture stops whatever a test started even when the test fails, and then prints the
tail of every process's log so a failure can be read from the pytest output alone. Every wait is a poll
under a deadline.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Collection, TypeVar

from node.bench.invariants import agreed_fingerprints, applied, replica_problems, round_sequence_problems
from node.bench.proctable import p2pd_processes
from node.roundlog import applied_rounds, coordinator_rounds, read_round_log as read_log  # the tests import both from here
from node.runfile import build_run_file
from node.status import fetch_status

T = TypeVar("T")
OWNER_ENV = "LOWBAND_TEST_P2PD_OWNER"  # the marker every process of one Cluster inherits (tests/dht_harness.py's too)

def write_run_file(path: Path, *, recipe: str = "sign", rounds: int = 6, H: int = 2, min_nodes: int = 2,
                   lease_s: float = 3.0, initial_wait_s: float = 20.0, min_wait_s: float = 1.0,
                   max_wait_s: float = 20.0, run_id: str | None = None, overlap: bool = False) -> Path:
    """A run file for the tests: the tiny model on small batches, short heartbeats, no evaluation."""
    path.write_text(build_run_file(
        run_id=run_id or f"it-{recipe}", recipe=recipe, rounds=rounds,
        task_params={"size": "tiny", "batch_size": 2, "block_size": 32},
        recipe_overrides={"H": H, "inner.lr": 2e-3, "overlap": overlap},
        membership={"min_nodes": min_nodes, "max_nodes": 16, "heartbeat_s": 0.5, "lease_s": lease_s},
        rounds_policy={"initial_wait_s": initial_wait_s, "min_wait_s": min_wait_s, "max_wait_s": max_wait_s,
                       "eval_every": 0}))
    return path


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float, interval_s: float = 0.1) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = probe()
            if value:
                return value
        except AssertionError:
            raise
        except Exception as exc:  # e.g. the coordinator is restarting: keep polling until the deadline
            last_error = exc
        if time.monotonic() >= end:
            suffix = f" (last error: {type(last_error).__name__}: {last_error})" if last_error else ""
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}{suffix}")
        time.sleep(interval_s)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




class Proc:
    def __init__(self, name: str, popen: subprocess.Popen, stdout: Path, stderr: Path, workdir: Path | None = None,
                 address: str = "") -> None:
        self.name, self.popen, self.stdout, self.stderr = name, popen, stdout, stderr
        self.workdir, self.address = workdir, address

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_exit(self, timeout_s: float) -> int:
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} (pid {self.pid}) did not exit within {timeout_s:.0f} s") from None

    def log_text(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""

    def kill9(self) -> None:
        """SIGKILL this process's group (it leads its own session) and reap it."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(timeout=30)


class Cluster:
    """Starts coordinator and node processes for one test; ``stop_all`` ends every one of them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[Proc] = []
        # every process it starts (and theirs: a DHT's p2pd) carries this marker, telling them apart from other
        # test runs' processes on a shared machine (``p2pd_pids``)
        self.owner = uuid.uuid4().hex
        self.env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                        **{OWNER_ENV: self.owner})

    def spawn(self, name: str, args: list[str], workdir: Path | None = None, program: list[str] | None = None) -> Proc:
        """``python -m node.cli ARGS`` (or ``python PROGRAM ARGS``, e.g. a script) in a new session; stdout to
        NAME.stdout, stderr to NAME.log."""
        n = sum(1 for p in self.procs if p.name.split(".")[0] == name)  # every restart gets a log of its own
        tag = name if n == 0 else f"{name}.{n}"
        out, err = self.root / f"{tag}.stdout", self.root / f"{tag}.log"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            popen = subprocess.Popen([sys.executable, *(program or ["-m", "node.cli"]), *args], stdout=fo, stderr=fe,
                                     stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        proc = Proc(tag, popen, out, err, workdir)
        self.procs.append(proc)
        return proc

    def coordinator(self, run_file: Path, state_dir: Path, listen: str = "127.0.0.1:0",
                    timeout_s: float = 60.0, extra: tuple[str, ...] = ()) -> Proc:
        proc = self.spawn("coordinator", ["coordinator", "--listen", listen, "--state-dir", str(state_dir),
                                           "--run", str(run_file), *extra])

        def address() -> str | None:
            if not proc.alive():
                raise AssertionError(f"coordinator exited with {proc.popen.returncode} before listening:\n"
                                     f"{proc.log_text()[-3000:]}")
            for line in proc.stdout.read_text(errors="replace").splitlines():
                if line.startswith("lowband coordinator listening on "):
                    return line.rsplit(" ", 1)[-1].strip()
            return None

        end = time.monotonic() + timeout_s
        while True:
            found = address()  # raises at once if the coordinator died
            if found:
                proc.address = found
                return proc
            if time.monotonic() >= end:
                raise AssertionError(f"coordinator printed no address within {timeout_s:.0f} s")
            time.sleep(0.1)

    def node(self, address: str, name: str, *extra: str) -> Proc:
        workdir = self.root / name
        return self.spawn(name, ["node", "--coordinator", address, "--workdir", str(workdir), "--name", name,
                                  "--device", "cpu", *extra], workdir)

    def stop_all(self, grace_s: float = 5.0) -> None:
        live = [p for p in self.procs if p.alive()]
        for p in live:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        end = time.monotonic() + grace_s
        for p in live:
            try:
                p.popen.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in live:  # SIGKILL each group we started and found running: also ends anything its leader left
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def p2pd_pids(self) -> set[int]:
        """The live p2pd daemons this cluster's processes started: each such process leads a session, and its p2pd
        stays in it and keeps the cluster's marker even once orphaned (its node died without stopping it). Other
        runs' p2pd never count."""
        return p2pd_processes(sessions=[p.pid for p in self.procs], environ={OWNER_ENV: self.owner})

    def dump_logs(self, lines: int = 40) -> str:
        parts = []
        for p in self.procs:
            text = p.log_text().splitlines()[-lines:]
            parts.append(f"----- {p.name} (pid {p.pid}, exit {p.popen.returncode}) {p.stderr} -----")
            parts.extend(text)
        return "\n".join(parts)


def printed(proc: Proc, prefix: str, timeout_s: float = 60.0) -> str:
    """The last word of the first line ``proc`` printed on stdout that starts with ``prefix`` (e.g. a URL)."""
    def find() -> str | None:
        for line in proc.stdout.read_text(errors="replace").splitlines():
            if line.startswith(prefix):
                return line.rsplit(" ", 1)[-1].strip()
        if not proc.alive():
            raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_text()[-3000:]}")
        return None
    return wait_for(f"{proc.name} to print {prefix!r}", find, timeout_s)


def status(address: str) -> Any:
    """The coordinator's Status answer (a ``StatusResponse`` message)."""
    return fetch_status(address, timeout_s=5.0)


def member_names(address: str) -> set[str]:
    return {m.name for m in status(address).members}


def wait_all_exit(procs: list[Proc], timeout_s: float) -> list[int]:
    """Exit codes of ``procs``, waiting for all of them under one deadline."""
    end = time.monotonic() + timeout_s
    codes = []
    for p in procs:
        try:
            codes.append(p.popen.wait(timeout=max(0.0, end - time.monotonic())))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{p.name} (pid {p.pid}) still running after {timeout_s:.0f} s") from None
    return codes


def terminate(*procs: Proc, timeout_s: float = 20.0) -> list[int]:
    """SIGTERM each process's group at once (what an operator's Ctrl-C or systemd stop does), then wait for
    all of them to exit; returns their exit codes."""
    for p in procs:
        if p.alive():
            os.killpg(p.pid, signal.SIGTERM)
    return wait_all_exit(list(procs), timeout_s)


def rounds_table(state_dir: Path) -> list[Any]:
    """The coordinator's committed rounds from its SQLite store (read after the coordinator stopped)."""
    return coordinator_rounds(state_dir)


def check_round_sequence(entries: list[dict[str, Any]], who: str) -> list[dict[str, Any]]:
    """Applied rounds follow each other by exactly 1 (a state adoption resets the expected round to its
    committed_rounds, never back); no round is applied twice (node/bench/invariants.py). Returns the applied-round
    entries."""
    problems = round_sequence_problems(entries, who)
    assert not problems, "\n".join(problems)
    return [dict(e) for e in applied(entries)]


def check_replicas(workdirs: dict[str, Path], rows: list[Any] | None, killed: Collection[str] = ()) -> dict[int, str]:
    """Every node's replica is the run's (``node.bench.invariants.replica_problems``): rounds in sequence, and each
    applied round's fingerprint and members the same on every node — and, with the coordinator's ``rows``
    (None: serverless), the ones the coordinator published and committed, with no gap in its rounds.
    ``killed``: nodes killed with SIGKILL during the test. Returns round → fingerprint."""
    logs = {name: read_log(wd) for name, wd in workdirs.items()}
    problems = replica_problems(logs, rows, killed)
    assert not problems, "\n".join(problems)
    return agreed_fingerprints(logs)


# -- serverless (DHT) mode -----------------------------------------------------------------------------------
def dht_peer(cluster: Cluster, timeout_s: float = 60.0) -> tuple[Proc, str]:
    """A ``lowband dht`` bootstrap peer on 127.0.0.1 and its multiaddr."""
    proc = cluster.spawn("dht", ["dht", "--listen", "/ip4/127.0.0.1/tcp/0"])

    def maddr() -> str | None:
        assert proc.alive(), f"dht peer exited with {proc.popen.returncode}:\n{proc.log_text()[-3000:]}"
        for line in proc.stdout.read_text(errors="replace").splitlines():
            if line.startswith("lowband dht peer ") and "/127.0.0.1/" in line:
                return line.rsplit(" ", 1)[-1].strip()
        return None

    return proc, wait_for("the DHT peer's multiaddr", maddr, timeout_s)


def dht_node(cluster: Cluster, maddr: str, name: str, run: Path, *extra: str) -> Proc:
    workdir = cluster.root / name
    return cluster.spawn(name, ["node", "--dht", "--initial-peers", maddr, "--listen", "/ip4/127.0.0.1/tcp/0",
                                "--run", str(run), "--workdir", str(workdir), "--name", name, "--device", "cpu",
                                *extra], workdir)


def node_maddr(proc: Proc, timeout_s: float = 60.0) -> str:
    """A DHT node's own 127.0.0.1 multiaddr, from its log: other nodes can bootstrap through it."""
    def find() -> str | None:
        for line in proc.log_text().splitlines():
            if "DHT address " in line and "/127.0.0.1/" in line:
                return line.rsplit(" ", 1)[-1].strip()
        return None

    return wait_for(f"{proc.name}'s DHT address", find, timeout_s)
