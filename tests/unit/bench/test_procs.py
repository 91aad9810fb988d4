"""Child processes for tools (node/bench/procs.py) and finding our own processes in /proc
(node/bench/proctable.py), with small shell and Python children."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from node.bench.procs import (child_env, read_coordinator_address, read_dht_address, read_printed, signal_group,
                              stop_group)
from node.bench.proctable import descendants, find_processes, has_environ, process_table


def python(code: str, **kw: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True, **kw)  # type: ignore[call-overload]


def test_child_env_sets_one_thread_without_touching_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = child_env(EXTRA="1")
    assert env["OMP_NUM_THREADS"] == "1" and env["EXTRA"] == "1"
    assert "OMP_NUM_THREADS" not in os.environ and "EXTRA" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert child_env()["OMP_NUM_THREADS"] == "3"  # the caller's choice stands


def test_addresses_are_read_from_the_lines_a_child_prints() -> None:
    proc = python("import time\nprint('starting'); print('lowband coordinator listening on 127.0.0.1:4321', "
                  "flush=True); time.sleep(60)")
    try:
        assert read_coordinator_address(proc, 60) == "127.0.0.1:4321"
    finally:
        assert stop_group(proc, grace_s=5) == -signal.SIGTERM
    proc = python("print('lowband dht peer /ip4/10.0.0.1/tcp/1/p2p/X'); print('lowband dht peer /ip4/127.0.0.1/tcp/2/p2p/Y')")
    try:
        assert read_dht_address(proc, 60) == "/ip4/127.0.0.1/tcp/2/p2p/Y"
    finally:
        stop_group(proc)


def test_a_child_that_exits_without_printing_is_an_error_not_a_wait() -> None:
    proc = python("import sys; print('no address here'); sys.exit(3)")
    with pytest.raises(RuntimeError, match="exited with 3 before printing it"):
        read_printed(proc, lambda line: None, 60, "the address")


def test_a_child_that_prints_nothing_times_out() -> None:
    proc = python("import time; time.sleep(60)")
    try:
        with pytest.raises(TimeoutError, match="not printed within"):
            read_printed(proc, lambda line: line, 0.5, "the address")
    finally:
        stop_group(proc, grace_s=5)


#: A grandchild that says its pid once it runs (so its name is the interpreter's, not the forking parent's) and
#: then idles; the child relays the pid and, with ``WAIT``, stays until the grandchild ends.
SPAWNER = """
import subprocess, sys
g = subprocess.Popen([sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); os.close(1); "
                      "time.sleep(60)"], stdout=subprocess.PIPE)
print(g.stdout.readline().decode().strip(), flush=True)
if sys.argv[1] == "WAIT":
    g.wait()
"""
OUR_NAME = open("/proc/self/comm").read().strip()  # the grandchild runs this interpreter too


def spawner(mode: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", SPAWNER, mode], stdout=subprocess.PIPE, start_new_session=True,
                            env=env)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def test_an_orphan_is_found_by_its_session_and_stop_group_ends_it() -> None:
    proc, orphan = spawner("EXIT")
    assert proc.wait(timeout=60) == 0  # its parent is gone: the grandchild left our process tree
    try:
        assert orphan not in descendants(os.getpid())
        assert process_table()[orphan].session == proc.pid
        assert orphan in find_processes(OUR_NAME, sessions=[proc.pid])
        assert orphan not in find_processes(OUR_NAME, under=os.getpid())
        assert orphan not in find_processes(OUR_NAME, sessions=[os.getsid(0)])
        exited = os.pidfd_open(orphan)  # readable once the orphan has exited (it is not our child to wait for)
        try:
            stop_group(proc)  # the group outlived its leader: stopping it ends the orphan too
            assert select.select([exited], [], [], 30)[0] == [exited], "the orphan outlived stop_group"
        finally:
            os.close(exited)
        assert orphan not in find_processes(OUR_NAME, sessions=[proc.pid])
    finally:
        try:
            os.kill(orphan, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_an_inherited_environment_marker_finds_a_grandchild_and_nothing_else() -> None:
    proc, grandchild = spawner("WAIT", env=child_env(RUN_MARK="abc"))
    try:
        assert has_environ(grandchild, {"RUN_MARK": "abc"}) and not has_environ(grandchild, {"RUN_MARK": "abd"})
        assert find_processes(OUR_NAME, environ={"RUN_MARK": "abc"}) == {proc.pid, grandchild}
        assert find_processes(OUR_NAME, environ={"RUN_MARK": "other"}) == set()
    finally:
        signal_group(proc, signal.SIGKILL)
        proc.wait()


def test_descendants_follow_the_parent_chain() -> None:
    proc, grandchild = spawner("WAIT")
    try:
        ours = descendants(os.getpid())
        assert {proc.pid, grandchild} <= ours
        assert os.getpid() not in ours and os.getppid() not in ours
        assert grandchild in find_processes(OUR_NAME, under=os.getpid())
        assert grandchild not in find_processes("p2pd", under=os.getpid())  # by name, not by ancestry alone
    finally:
        signal_group(proc, signal.SIGKILL)
        proc.wait()


def test_stat_lines_with_odd_process_names_parse(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "stat").write_text("42 (a (b) c) S 7 42 40 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 1298\n")
    (tmp_path / "43").mkdir()  # exited between the listing and the read: left out
    (tmp_path / "self").mkdir()
    table = process_table(str(tmp_path))
    assert list(table) == [42]
    e = table[42]
    assert (e.pid, e.comm, e.state, e.ppid, e.session) == (42, "a (b) c", "S", 7, 40)
