"""``lowband`` child processes for tools (demo, benches, soak): start each in its own process group, read the
address it prints, signal and stop the whole group.

A child leads its own session, so a signal to its group reaches what it started too (a hivemind DHT process and
its p2pd), and nothing signals the tool that started it. Tools never change their own environment for their
children: they pass ``env`` (``child_env`` builds one).
"""
from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

from node.dht_peer import PEER_PREFIX as DHT_MARKER  # ``lowband dht`` prints one such line per multiaddr

#: The coordinator's stdout line with its address (``--listen HOST:0`` binds a free port and prints it); the
#: coordinator package prints it, and ``node`` never imports ``coordinator``.
COORDINATOR_MARKER = "lowband coordinator listening on "


def child_env(base: Mapping[str, str] | None = None, **overrides: str) -> dict[str, str]:
    """The environment for a child: ``base`` (default: this process's), one intra-op thread unless the caller's
    environment already chose a number (children share the cores with each other: extra threads only spin), then
    ``overrides``."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(overrides)
    return env


def lowband_argv(args: list[str], prefix: list[str] | None = None) -> list[str]:
    """The command line of ``lowband ARGS`` with this interpreter; ``prefix`` runs it through e.g.
    ``ip netns exec NS``."""
    return [*(prefix or []), sys.executable, "-m", "node.cli", *args]


def spawn_lowband(args: list[str], log_path: Path, *, stdout: int | None = None, prefix: list[str] | None = None,
                  env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """``lowband ARGS`` in a new session, stderr (and stdout unless given, e.g. ``subprocess.PIPE``) appended to
    ``log_path``."""
    with open(log_path, "ab") as out:  # the child holds its own descriptor: ours can close at once
        return subprocess.Popen(lowband_argv(args, prefix), stdout=out if stdout is None else stdout, stderr=out,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env=None if env is None else dict(env))


def read_printed(proc: subprocess.Popen, pick: Callable[[str], str | None], timeout_s: float, what: str) -> str:
    """The first non-None ``pick(line)`` over the lines ``proc`` prints on its stdout (a pipe). Blocks on the pipe
    (no polling); raises RuntimeError when the process exits first and TimeoutError after ``timeout_s``."""
    if proc.stdout is None:
        raise ValueError(f"{what}: the process's stdout is not a pipe")
    fd = proc.stdout.fileno()
    end = time.monotonic() + timeout_s
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{what}: not printed within {timeout_s:.0f} s")
            if not sel.select(timeout=left):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:  # EOF: the process closed its stdout, i.e. it exited
                raise RuntimeError(f"{what}: the process exited with {proc.wait()} before printing it")
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                found = pick(line.decode(errors="replace"))
                if found is not None:
                    return found


def _after(marker: str, contains: str = "") -> Callable[[str], str | None]:
    def pick(line: str) -> str | None:
        if line.startswith(marker) and contains in line:
            return line.rsplit(" ", 1)[-1].strip()
        return None
    return pick


def read_coordinator_address(proc: subprocess.Popen, timeout_s: float) -> str:
    """``HOST:PORT`` that a ``lowband coordinator`` started with ``stdout=PIPE`` prints once it listens."""
    return read_printed(proc, _after(COORDINATOR_MARKER), timeout_s, "the coordinator's address")


def read_dht_address(proc: subprocess.Popen, timeout_s: float, host: str = "127.0.0.1") -> str:
    """The multiaddr on ``host`` that a ``lowband dht`` started with ``stdout=PIPE`` prints."""
    return read_printed(proc, _after(DHT_MARKER, f"/{host}/"), timeout_s, f"the DHT peer's address on {host}")


def signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    """``sig`` to the process group that ``proc`` leads; a group that is gone already is no error."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> int:
    """SIGTERM the process group, SIGKILL what is left after ``grace_s`` (a child that exited may have left
    processes in its group), reap ``proc`` and return its exit code."""
    if proc.poll() is None:
        signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    signal_group(proc, signal.SIGKILL)
    return proc.wait()
